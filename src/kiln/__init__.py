"""kiln: from raw text to a trained, evaluated, compressed Transformer.

    import kiln
    run_dir = kiln.pretrain("configs/shakespeare-char.yaml", overrides=["--train.max_steps", "200"])
    model, tokenizer, cfg = kiln.load(run_dir)
    print(kiln.sample(run_dir, "ROMEO:", max_new_tokens=100))
    print(kiln.evaluate(run_dir, "held_out.txt")["perplexity"])
"""

from kiln._version import __version__
from kiln.errors import KilnError


def __getattr__(name):  # lazy: `import kiln` stays fast and torch-free until needed
    if name in ("pretrain", "load", "sample", "prepare_data", "evaluate", "predict", "finetune"):
        from kiln import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["KilnError", "pretrain", "finetune", "load", "sample", "prepare_data", "evaluate", "predict",
           "__version__"]
