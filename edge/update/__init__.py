"""Signed updates of the agent: TUF metadata (python-tuf), A/B slots, a health-gated commit.

- ``fetch``: the hall repository through tuf.ngclient, resumable ranged bundle downloads;
- ``bundle``: the bundle format and its installation into a slot's venv;
- ``slots``: the two slots, the ``current`` symlink, the durable state and the boot guard
  (standard library only: it runs before the agent, from the system Python);
- ``machine``: request, prepare, switch, commit, rollback;
- ``kiosk``: what the agent does with it (the ``update`` command, the idle check, the
  health gate of a new slot).

docs/updates.md has the whole path, from ``hallkiosk provision release`` to a wave.
"""
