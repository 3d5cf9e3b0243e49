from auraserve.cli import main

if __name__ == "__main__":  # spawned ranks and workers import this module; only `python -m` runs it
    main()
