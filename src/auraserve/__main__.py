from auraserve.cli import main

main()
