"""`ray job submit --working-dir . -- python -m jobs.batch_predict --model DIR --data DIR --out DIR`."""

from jobs import run

if __name__ == "__main__":
    run("predict")
