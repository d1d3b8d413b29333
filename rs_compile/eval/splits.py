"""Held-out evaluation data and calibration data, kept disjoint.

Quality must be judged on data no calibration step has seen: sentences for encoders, and for causal
LMs the seed that samples teacher-forcing text from the original model.
"""

from __future__ import annotations

CALIBRATION_SEED = 0
HELDOUT_SEED = 20240917

HELDOUT_SENTENCES: tuple[str, ...] = (
    "The train to Edinburgh was delayed by forty minutes because of snow on the tracks.",
    "She added a pinch of saffron to the rice and let it simmer on low heat.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The committee postponed its vote until the auditors finish their report.",
    "My grandfather repaired old clocks in a small workshop behind the bakery.",
    "A sudden gust of wind lifted the umbrella out of his hands.",
    "The new library opens at nine on weekdays and at ten on Saturdays.",
    "Volcanic ash can disrupt air traffic across an entire continent.",
    "He forgot his password again and had to reset it through email.",
    "The orchestra rehearsed the second movement until the strings were perfectly in tune.",
    "Penguins huddle together to survive the Antarctic winter.",
    "The startup raised twelve million dollars to build cheaper batteries.",
    "Please remember to water the tomatoes while I am away.",
    "The detective noticed that the muddy footprints led away from the window.",
    "Regular exercise lowers the risk of heart disease and improves sleep.",
    "The bridge was closed for repairs after engineers found cracks in a pillar.",
    "Children in the village walk three kilometres to reach the nearest school.",
    "The museum acquired a rare map drawn by a sixteenth-century navigator.",
    "Interest rates rose for the third time this year, cooling the housing market.",
    "Our flight landed early, so we had breakfast at the airport.",
    "The goalkeeper saved a penalty in the final minute of the match.",
    "Honey never spoils if it is kept in a sealed container.",
    "The software update fixed the bug that drained the phone's battery overnight.",
    "A thick fog rolled in from the harbour just before sunset.",
    "The students built a small robot that sorts recycling by colour.",
    "Her novel tells the story of three sisters who inherit a failing vineyard.",
    "The river flooded the lower fields after a week of heavy rain.",
    "Most cats sleep for more than twelve hours a day.",
    "The chef recommends the grilled fish with lemon and capers.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "The town council approved a plan to plant a thousand trees along the main road.",
    "I could not find my keys until I checked the pocket of yesterday's coat.",
    "The violin was handed down through four generations of the family.",
    "Vaccines train the immune system to recognise a pathogen before infection.",
    "The hikers reached the summit just as the clouds began to clear.",
    "A power outage left half of the city without electricity for six hours.",
    "He practises the piano every morning before going to work.",
    "The ancient temple was rediscovered beneath dense jungle vegetation.",
    "Supermarkets are reducing plastic packaging on fresh vegetables.",
    "The puppy chewed through the cable of the new headphones.",
)

CALIBRATION_SENTENCES: tuple[str, ...] = (
    "The farmer checked the fences before the storm arrived.",
    "Programming languages differ in how they manage memory.",
    "We watched the fireworks from the roof of our building.",
    "The price of coffee beans has doubled over the past two years.",
    "A good night's sleep helps the brain consolidate memories.",
    "The ferry crosses the bay every hour during the summer.",
    "She painted the kitchen walls a pale shade of yellow.",
    "Earthquakes are measured with instruments called seismometers.",
    "The team celebrated their victory with a parade through the city.",
    "He borrowed three books about medieval history from the library.",
    "Solar panels on the school roof supply most of its electricity.",
    "The baby giraffe stood up within an hour of being born.",
)
