"""lm-evaluation-harness's command line with the `lolcats_jax` model registered:

    python -m lolcats_jax.eval.lm_eval_cli --model lolcats_jax --model_args pretrained=PATH --batch_size 8 --tasks piqa

Every other argument is lm_eval's own (`--help`). Tasks that lm_eval fetches from the Hugging Face hub need
network access; local task YAMLs work offline with `--include_path DIR`.
"""

import lolcats_jax.eval.lm_eval_adapter  # noqa: F401  (registers the model name "lolcats_jax")


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
