"""Methods: what each one changes in a run, in one class per method. The trainer and the planner ask
the method; neither branches on its type. Adding a method is one class here (registered in
`METHODS`) plus its config entry (`core/config.py`, the `method.type` union).

    vanilla               OPD: A_t = log pi_t(y_t) - log pi_s(y_t), nothing else
    effopd                at the search steps, score W_t + c_k (W_t - anchor) on D_v and jump to the
                          last candidate the sequential rule accepts (EffOPD, paper section 4.1)
    fixed_extrapolation   at the search steps, jump to W_t + 2k (W_t - anchor) without scoring
    exopd                 A_t = lam (log pi_t - log pi_ref) - (log pi_s - log pi_ref) with a frozen
                          reference pi_ref = W_0 scored beside the teacher (G-OPD reward extrapolation)

What a method owns:
    lam, loss_spec        the advantage's extrapolation factor and the learner's loss spec
    teacher_scores        what the teacher returns besides log pi_t(y_t)
    uses_reference        a frozen pi_ref scored beside the teacher (its memory in the plan)
    extrapolates          the learner keeps a partition-local anchor (its memory in the plan) and
                          the loop runs `decide` at `searches_at` steps (a pipeline barrier)
    candidates, val_size  EffOPD candidates scored per search and |D_v| (the plan's cost; the pool)
    evaluators            `dedicated` (a role of its own in the plan), `borrowed` or None
    decide(step, score)   the search: which candidate to jump to
    check(cfg, plan, file) combinations the method refuses
"""

from __future__ import annotations

from typing import Any, Callable

from core.config import ConfigError, importance_correction_of
from core.extrapolation import Decision, accept
from core.losses import NEEDS_TEACHER_DISTRIBUTION


class Method:
    """Plain OPD; the base every method extends."""

    type = "vanilla"
    extrapolates = False
    uses_reference = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @property
    def lam(self) -> float:
        return 1.0

    def loss_spec(self, cfg: Any) -> dict[str, Any]:
        """The learner's loss: the configured kind with this method's lam (and the importance
        correction resolved for the rollout source, `importance_correction_of`)."""
        loss = cfg.loss
        return {"kind": loss.type, "lam": self.lam, "rlvr_mix": loss.rlvr_mix,
                "importance_correction": importance_correction_of(cfg), "importance_threshold": loss.importance_threshold}

    def teacher_scores(self, loss: Any) -> dict[str, Any]:
        """What the teacher returns besides log pi_t(y_t): its distribution (full, or top-k) for the
        full-vocabulary losses, and the reference policy's log-probs when lam != 1 (ExOPD)."""
        full = loss.type in NEEDS_TEACHER_DISTRIBUTION
        topk = loss.teacher_topk if full else None
        return {"full": full and topk is None, "topk": topk, "ref": self.lam != 1.0}

    @property
    def candidates(self) -> int:
        """Candidates scored on D_v per search (0: nothing is scored)."""
        return 0

    @property
    def val_size(self) -> int:
        return 50

    @property
    def params(self) -> str:
        """What a jump moves, as the learner takes it: which weights (`core.extrapolation.extrapolated`:
        `all` | `attn_mlp`), with `:rank1` when each matrix moves along its Delta's rank-1 part."""
        names = getattr(self.cfg, "params", "all")
        return names + (":rank1" if getattr(self.cfg, "subspace", "full") == "rank1" else "")

    @property
    def val_score(self) -> str:
        return "accuracy"

    @property
    def evaluators(self) -> str | None:
        """Who scores candidates: `dedicated` evaluators, the `borrowed` rollout engines, or None."""
        return None

    def searches_at(self, step: int) -> bool:
        return False

    def decide(self, step: int, score: Callable[[list[float]], list[float]]) -> Decision:
        raise NotImplementedError(f"method {self.type} does not search")

    def check(self, cfg: Any, plan: Any, file: Any) -> None:
        """Refuse combinations this method cannot run (a ConfigError naming the key)."""


class EffOPD(Method):
    type = "effopd"
    extrapolates = True

    @property
    def candidates(self) -> int:
        return len(self.cfg.coefficients())

    @property
    def val_size(self) -> int:
        return self.cfg.val_size

    @property
    def val_score(self) -> str:
        return self.cfg.score

    @property
    def evaluators(self) -> str | None:
        return self.cfg.evaluators

    def searches_at(self, step: int) -> bool:
        return self.cfg.searches_at(step)

    def decide(self, step: int, score: Callable[[list[float]], list[float]]) -> Decision:
        """V of W_t and of every candidate (scored in parallel), then the sequential accept rule."""
        coefs = [0.0] + self.cfg.coefficients()
        base, *scores = score(coefs)
        k = accept(base, scores, self.cfg.comparison, self.cfg.zero_guard)
        return Decision(step, base, scores, k, self.cfg.comparison, coefs[k])

    def check(self, cfg: Any, plan: Any, file: Any) -> None:
        if self.cfg.score == "teacher_kl" and plan.role("rollout").backend == "vllm":
            raise ConfigError(file, "method.score", "teacher_kl scores candidates with an HF teacher; vLLM "
                                                    "engines score accuracy (set rollout.backend=hf or method.score=accuracy)")


class FixedExtrapolation(Method):
    type = "fixed_extrapolation"
    extrapolates = True

    def searches_at(self, step: int) -> bool:
        return self.cfg.searches_at(step)

    def decide(self, step: int, score: Callable[[list[float]], list[float]]) -> Decision:
        """Candidate k, unscored."""
        k = self.cfg.k
        return Decision(step, float("nan"), [float("nan")] * k, k, "fixed", self.cfg.coefficients()[k - 1])


class ExOPD(Method):
    type = "exopd"
    uses_reference = True

    @property
    def lam(self) -> float:
        return self.cfg.lam

    def check(self, cfg: Any, plan: Any, file: Any) -> None:
        if cfg.loss.type != "pg_reverse_kl":
            raise ConfigError(file, "loss.type", f"method.type=exopd extrapolates the policy-gradient advantage; "
                                                 f"loss.type={cfg.loss.type} has none (use pg_reverse_kl)")


METHODS: dict[str, type[Method]] = {m.type: m for m in (Method, EffOPD, FixedExtrapolation, ExOPD)}


def method_of(cfg: Any) -> Method:
    """The method a run's `method` section names."""
    return METHODS[cfg.type](cfg)
