"""`ray job submit --working-dir . -- python -m jobs.tune --config jobs/configs/....yaml [--set k=v]`."""

from jobs import run

if __name__ == "__main__":
    run("tune")
