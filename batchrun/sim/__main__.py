"""``python -m batchrun.sim --port 0 --port-file F --rpm 60 ...``"""

from batchrun.sim.run import main

if __name__ == "__main__":
    raise SystemExit(main())
