"""lm-evaluation-harness model `lolcats_jax`: any harness task, scored by this project's JAX models.

    import lolcats_jax.eval.lm_eval_adapter  # registers "lolcats_jax" with lm_eval
    lm_eval.simple_evaluate(model="lolcats_jax", model_args="pretrained=PATH,dtype=float32", batch_size=8, tasks=[...])
    lm_eval.simple_evaluate(model=LolcatsJaxLM(model=model, tokenizer=tokenizer), tasks=[...])  # in memory

or from the shell (lm_eval 0.4.13 does not discover models through entry points, so `lm_eval_cli` registers
the model and then runs the harness's own CLI):

    python -m lolcats_jax.eval.lm_eval_cli --model lolcats_jax --model_args pretrained=PATH --batch_size 8 --tasks piqa

Model arguments: pretrained, dtype (float32 | bfloat16), mesh (DATAxFSDPxTENSOR, e.g. `mesh=1x-1x1`: the model
sharded over every device with FSDP, -1 = the remaining devices; default one device), max_length (default: the
model's context length), max_gen_toks (default 256); batch_size comes from the harness (input rows per forward).

`loglikelihood` uses the batched scorer (same tokenisation as the harness's `_encode_pair`),
`loglikelihood_rolling` the harness's own rolling windows (prefix token BOS/EOS, windows of max_length), and
`generate_until` greedy decoding with `lolcats_jax.inference.generation.Generator` (sampling arguments are refused).
Requires the `lm_eval` package (pinned in requirements/lock.txt).
"""

from __future__ import annotations

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - lm_eval is pinned in the lock file
    raise ImportError(
        "lolcats_jax.eval.lm_eval_adapter needs lm-evaluation-harness: pip install lm_eval==0.4.13 "
        "(see requirements/lock.txt)"
    ) from err

from lolcats_jax.eval.encoding import PairEncoder, encode, prefix_token_id
from lolcats_jax.eval.scoring import Scorer


@register_model("lolcats_jax")
class LolcatsJaxLM(LM):
    """A lolcats_jax model (HF directory or run directory via `pretrained`, or an in-memory `model` +
    `tokenizer`) behind the harness's LM interface."""

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size: int | str = 8,
                 dtype: str = "float32", mesh: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 **harness_kwargs):
        super().__init__()
        from lolcats_jax.inference.loading import cli_mesh

        self.mesh = cli_mesh(_mesh_spec(mesh)) if mesh is not None else None
        unknown = sorted(k for k in harness_kwargs if k not in ("device", "max_batch_size"))  # harness extras, unused
        if unknown:
            raise TypeError(f"lolcats_jax model: unknown arguments {unknown}")
        if model is None:
            if pretrained is None:
                raise TypeError("lolcats_jax model: give pretrained=PATH (or model= and tokenizer=)")
            from lolcats_jax.inference.loading import load_for_generation

            with self._scope():
                model, tokenizer = load_for_generation(pretrained, dtype=dtype, mesh=self.mesh)
        elif tokenizer is None:
            raise TypeError("lolcats_jax model: an in-memory model needs its tokenizer")
        if str(batch_size).startswith("auto"):
            batch_size = 8  # no memory probing: a fixed, safe default
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(model, max_length=max_length, mesh=self.mesh)
        self.max_length = self.scorer.max_length
        self._encoder = PairEncoder(tokenizer)
        self._generator = None

    def _scope(self):
        from lolcats_jax.inference.loading import mesh_scope

        return mesh_scope(self.mesh)

    # ------------------------------------------------------------------------------------ log-likelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        with self._scope():
            results = self.scorer.loglikelihoods(self._encoder.encode_all(pairs), self.batch_size)
        for pair, res in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        prefix = prefix_token_id(self.tokenizer)
        windows, owner = [], []
        for i, req in enumerate(requests):
            ids = encode(self.tokenizer, req.args[0])
            for w in get_rolling_token_windows(ids, prefix, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        with self._scope():
            scored = self.scorer.loglikelihoods(windows, self.batch_size)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scored):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ------------------------------------------------------------------------------------ generation

    def _stop_strings(self, until) -> list[str]:
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        eos = self.tokenizer.decode([self.tokenizer.eos_token_id]) if self.tokenizer.eos_token_id is not None else None
        return [s for s in list(until) + ([eos] if eos else []) if s]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lolcats_jax.inference.generation import Generator
        from lolcats_jax.tokenizer import eos_ids

        if self._generator is None:
            self._generator = Generator(self.model)
        jobs = []  # (index, prompt ids, max new tokens, stop strings)
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0.0:
                raise ValueError(f"lolcats_jax model: greedy decoding only, got {kwargs}")
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = encode(self.tokenizer, context)[-max(1, self.max_length - max_new) :] or [prefix_token_id(self.tokenizer)]
            jobs.append((i, ids, max_new, self._stop_strings(kwargs.get("until"))))
        stop_ids = eos_ids(self.tokenizer, getattr(self.model.cfg, "eos_token_id", None))
        out: list[str] = [""] * len(requests)
        jobs.sort(key=lambda j: (j[2], -len(j[1])))
        for b in range(0, len(jobs), self.batch_size):
            batch = jobs[b : b + self.batch_size]
            with self._scope():
                new = self._generator.generate([j[1] for j in batch], max(j[2] for j in batch), eos_ids=stop_ids)
            for (i, _, max_new, stops), toks in zip(batch, new):
                text = self.tokenizer.decode(toks[:max_new], skip_special_tokens=False)
                for s in stops:
                    text = text.split(s, 1)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def _mesh_spec(text: str) -> str:
    """"1x8x1" (data x fsdp x tensor [x expert]; the harness splits model_args at commas) → "data=1,fsdp=8,tensor=1"."""
    parts = str(text).lower().split("x")
    if len(parts) not in (3, 4):
        raise ValueError(f"lolcats_jax model: mesh={text!r} must be DATAxFSDPxTENSOR[xEXPERT], e.g. 1x-1x1")
    return ",".join(f"{name}={size}" for name, size in zip(("data", "fsdp", "tensor", "expert"), parts))
