"""`ray job submit --working-dir . -- python -m jobs.pretrain --config jobs/configs/pretrain.yaml [--set k=v]`."""

from jobs import run

if __name__ == "__main__":
    run("pretrain")
