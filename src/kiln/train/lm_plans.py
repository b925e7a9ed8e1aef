"""The pretraining objectives, registered by name (`objective:` in the config): what each needs of the model and
the data, and how it turns token windows into a loss. The wiring (kiln.tasks.lm on the one driver) is the same for all.

    OBJECTIVES["mlm"].plan(cfg, run_dir, manifest) -> Plan(objective, masks windows per micro-batch, evaluates
                                                           masked-token loss/accuracy)

A new objective is a class with `arch` and the three hooks below, and a line in OBJECTIVES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kiln.errors import KilnError


@dataclass
class Plan:
    objective: object | None = None          # None: plain causal LM (kiln.train.objectives.CausalLM)
    batch: Callable | None = None            # (windows of micro-batch i, i) -> the batch the objective takes
    evaluate: Callable | None = None         # (model, val_windows) -> val metrics; None: val loss and perplexity
    unit: str = "tok"                        # what the progress line counts per second


class CausalLMObjective:
    name, arch, help = "clm", "decoder", "causal LM: next-token prediction"

    def check(self, cfg) -> None:
        pass

    def prepare(self, cfg, run_dir, manifest) -> Plan:
        return Plan()

    def wrap(self, cfg, model, device, log):
        return model


class MaskedLMObjective(CausalLMObjective):
    name, arch, help = "mlm", "encoder", "masked LM (BERT): predict ~15% masked tokens"

    def check(self, cfg) -> None:
        if cfg.model.arch != "encoder":
            raise KilnError(f"objective {cfg.objective} trains an encoder: set model.arch encoder (got "
                            f"{cfg.model.arch!r}), e.g. configs/bert-mlm.yaml")
        if cfg.data.mixture:
            raise KilnError(f"objective {cfg.objective} with data.mixture is not supported yet: prepare one dataset")

    def prepare(self, cfg, run_dir, manifest) -> Plan:
        from kiln.train.mlm import from_tokenizer

        mlm = from_tokenizer(run_dir / "tokenizer.json", int(manifest["vocab_size"]), cfg.mlm.mask_prob, cfg.seed)
        if cfg.model.vocab_size < mlm.vocab_size:  # room for an appended [MASK]
            cfg.model.vocab_size = mlm.vocab_size
        whole = cfg.mlm.whole_word
        # masks are a function of (seed, micro-batch index): exact resume
        return Plan(mlm, lambda windows, i: mlm.mask(windows, i, whole),
                    lambda m, val_windows: mlm.evaluate(m, val_windows, whole), "masked tok")


class ElectraObjective(MaskedLMObjective):
    name, arch, help = "electra", "encoder", "ELECTRA: replaced-token detection with a small generator"

    def check(self, cfg) -> None:
        if not 0.0 < cfg.electra.generator_fraction <= 1.0:
            raise KilnError(f"electra.generator_fraction must be in (0, 1], got {cfg.electra.generator_fraction}")
        super().check(cfg)

    def prepare(self, cfg, run_dir, manifest) -> Plan:
        from kiln.train.electra import ReplacedTokenDetection

        plan = super().prepare(cfg, run_dir, manifest)
        rtd = ReplacedTokenDetection(plan.objective, cfg.electra.weight, cfg.mlm.whole_word)
        return Plan(rtd, plan.batch, lambda m, val_windows: rtd.evaluate(m, val_windows), plan.unit)

    def wrap(self, cfg, model, device, log):
        from kiln.train.electra import Electra, generator_config

        gen_cfg = generator_config(cfg.model, cfg.electra.generator_fraction)
        model = Electra(model, gen_cfg).to(device)
        log(f"electra: generator d_model {gen_cfg.d_model}, {gen_cfg.n_head} head(s), "
            f"{model.generator.num_parameters() / 1e6:.2f}M parameters; detection loss weight {cfg.electra.weight:g}")
        return model


OBJECTIVES = {o.name: o for o in (CausalLMObjective(), MaskedLMObjective(), ElectraObjective())}


def objective_for(cfg):
    from kiln.errors import did_you_mean

    if cfg.objective not in OBJECTIVES:
        raise KilnError(f"objective {cfg.objective!r} is unknown{did_you_mean(cfg.objective, OBJECTIVES)}; "
                        f"objectives: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.objective]
