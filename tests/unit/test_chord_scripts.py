"""The chord bookkeeping in Redis is Celery's (the chords themselves, across both workers:
``tests/interop/test_chord_interop.py``)."""

from __future__ import annotations


def test_our_lua_scripts_are_celerys() -> None:
    """Both sides must run the same scripts on the same keys (and share Redis's script
    cache): ours are Celery's, verbatim."""
    import celery.backends.redis as theirs

    from aio_celery import backend as ours

    assert ours.CHORD_PART_RETURN_LUA == theirs.CHORD_PART_RETURN_LUA
    assert ours.CHORD_CLEANUP_LUA == theirs.CHORD_CLEANUP_LUA
    assert ours.CHORD_CLAIM_EXTEND_LUA == theirs.CHORD_CLAIM_EXTEND_LUA
    assert ours.group_key("g", ".j") == "celery-taskset-meta-g.j"
