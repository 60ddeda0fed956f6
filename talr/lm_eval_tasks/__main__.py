"""python -m talr.lm_eval_tasks DATA_DIR OUT_DIR: write the offline tasks as an lm-eval include path."""

import argparse

from talr.lm_eval_tasks import LOCAL_TASKS, write_task_dir


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m talr.lm_eval_tasks", description=__doc__)
    parser.add_argument("data_dir", help="benchmark files in their original formats (see talr/lm_eval_tasks/readers.py)")
    parser.add_argument("out_dir", help="where to write the task YAMLs")
    args = parser.parse_args()
    out = write_task_dir(args.data_dir, args.out_dir)
    print(f"wrote {', '.join(LOCAL_TASKS)} to {out}; use it as:")
    print(f"  lm_eval --model hf --model_args pretrained=<model dir> --tasks talr_arc_easy --include_path {out}")


if __name__ == "__main__":
    main()
