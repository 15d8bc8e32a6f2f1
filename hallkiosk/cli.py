"""The `hallkiosk` console command (subcommands filled in by each package)."""
import argparse, sys
def main(argv=None):
    p = argparse.ArgumentParser(prog="hallkiosk")
    p.parse_args(argv)
    return 0
if __name__ == "__main__":
    sys.exit(main())
