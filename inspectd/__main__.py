"""`python -m inspectd` and the `inspectd` command (pyproject's [project.scripts]).

SIGHUP is held first, before the command-line module and its imports load (`inspectd.hangup`).
"""

from inspectd import hangup


def run() -> int:
    hangup.hold()
    from inspectd.cli import main  # after the hold: importing it takes the time a HUP must not end

    try:
        return main()
    finally:
        hangup.ignore_to_exit()


if __name__ == "__main__":
    raise SystemExit(run())
