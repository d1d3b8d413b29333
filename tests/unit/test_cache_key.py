"""The Inductor cache key follows every byte of the package sources."""

import shutil

from rs_compile.lowering.cache import (
    PACKAGE_DIR,
    SOURCE_KEYED_PASS,
    SourceKeyedPass,
    source_hash,
    with_source_key,
)


def test_source_hash_changes_with_any_source_file(tmp_path):
    copy = tmp_path / "rs_compile"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_hash(copy)
    assert source_hash(copy) == before
    assert before == source_hash(PACKAGE_DIR)  # a faithful copy keys the same
    lowering = copy / "lowering" / "linear.py"
    lowering.write_text(lowering.read_text() + "\n# edited\n")
    source_hash.cache_clear()
    assert source_hash(copy) != before


def test_pass_uuid_is_the_source_hash():
    from rs_compile.lowering import cpu_kernel

    suffix = "+cpu-kernel" if cpu_kernel.kernel() is not None else ""  # what the lowering emits
    assert SourceKeyedPass().uuid() == source_hash() + suffix


def test_sources_outside_the_compile_path_do_not_invalidate_the_cache(tmp_path):
    copy = tmp_path / "rs_compile"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_hash(copy)
    cli = copy / "cli.py"
    cli.write_text(cli.read_text() + "\n# edited\n")
    source_hash.cache_clear()
    assert source_hash(copy) == before


def test_the_source_key_follows_the_users_passes_once():
    user = object()  # stands for the user's pass
    assert with_source_key(None) is SOURCE_KEYED_PASS
    assert with_source_key(user) == (user, SOURCE_KEYED_PASS)
    assert with_source_key([user]) == (user, SOURCE_KEYED_PASS)
    keyed = with_source_key(user)
    assert with_source_key(keyed) is keyed  # re-applied on every trace: never a second copy
