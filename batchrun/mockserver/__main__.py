"""``python -m batchrun.mockserver --port 0 --port-file F --rpm 60 ...``"""

from batchrun.mockserver.run import main

if __name__ == "__main__":
    raise SystemExit(main())
