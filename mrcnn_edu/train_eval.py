"""Evaluation during training: a validation score every ``eval_every`` steps, the best kept.

The trainer stays generic: it takes any ``evaluate(model) -> {metric: float}`` callable and the
metric names (the first one ranks the checkpoints: higher is better). :class:`PeriodicEvaluation`
holds them with the bookkeeping (when to evaluate, the best score and its step, the last
result) that a checkpoint saves, so ``best.npz`` survives a resume. :func:`coco_evaluator` is
the callable ``mrcnn-edu train --val-data`` uses: COCO segm and bbox AP/AP50 on a validation set.

Evaluating must not change the training run, or exact resume breaks: the trainer saves its two
generators' states before the call and restores them after (so a model that draws random
numbers while predicting leaves no trace), and puts the model back in training mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from .nn.module import Module

COCO_METRICS = ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50")
BEST_NAME = "best.npz"


class PeriodicEvaluation:
    """``evaluate(model)`` every ``every`` steps and at the last step; the best result kept.

    Args:
        evaluate: ``model -> {metric: float}``; called with the model in eval mode.
        metrics: the metric names to record (columns of ``log.csv``); ``metrics[0]`` ranks the
            results for ``best.npz`` (higher is better).
        every: steps between evaluations (``TrainConfig.eval_every``, ``>= 1``).

    Attributes:
        best_step, best_value: the step and score of the best result so far (0 and NaN before
            the first evaluation).
        last_step, last: the latest evaluation's step and ``{metric: value}``.
    """

    def __init__(self, evaluate: Callable[[Module], Mapping], metrics: Sequence[str], every: int):
        if not callable(evaluate):
            raise ValueError(f"evaluate must be callable, got {type(evaluate).__name__}")
        metrics = tuple(metrics)
        if not metrics or not all(isinstance(m, str) and m for m in metrics):
            raise ValueError(f"metrics must be non-empty metric names, got {metrics!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"eval_every must be an integer >= 1, got {every!r}")
        self.evaluate = evaluate
        self.metrics = metrics
        self.every = every
        self.best_step = 0
        self.best_value = math.nan
        self.last_step = 0
        self.last: dict[str, float] = {}

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.every == 0 or step == max_steps

    def run(self, model: Module, step: int, rngs: Sequence) -> tuple[dict[str, float], bool]:
        """Evaluate ``model`` after ``step`` in eval mode, then put it back in training mode
        and ``rngs`` (the trainer's generators) back in the states they had, so evaluating
        leaves the training run unchanged. Returns the metrics and whether they are the best
        so far (the first finite score always is)."""
        states = [rng.bit_generator.state for rng in rngs]
        model.eval()
        try:
            values = self.evaluate(model)
        finally:
            for rng, state in zip(rngs, states):
                rng.bit_generator.state = state
            model.train()
        if not isinstance(values, Mapping) or any(m not in values for m in self.metrics):
            raise ValueError(
                f"evaluate(model) must return a dict with the metrics {list(self.metrics)}, got "
                f"{values if not isinstance(values, Mapping) else list(values)}"
            )
        values = {m: float(values[m]) for m in self.metrics}
        self.last_step, self.last = step, values
        score = values[self.metrics[0]]
        best = self.best_value
        improved = not math.isnan(score) and (math.isnan(best) or score > best)
        if improved:
            self.best_step, self.best_value = step, score
        return values, improved

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the best result, so ``best.npz`` is only replaced by a
        better model after a resume."""
        return {"best_step": self.best_step, "best_value": self.best_value}

    def load_state_dict(self, state: Mapping) -> None:
        self.best_step = int(state.get("best_step", 0))
        self.best_value = float(state.get("best_value", math.nan))

    def line(self) -> str:
        """One line for the console: the latest result and the best so far."""
        shown = "  ".join(f"{k} {v:.4f}" for k, v in self.last.items())
        return f"eval at step {self.last_step}: {shown}  (best {self._best()})"

    def summary(self) -> str:
        """The end-of-training summary: the best step and score, and the last score."""
        key = self.metrics[0]
        last = self.last.get(key, math.nan)
        return (
            f"validation: best {key} {self._best()}, kept in {BEST_NAME}; last {key} "
            f"{last:.4f} at step {self.last_step}"
        )

    def _best(self) -> str:
        if math.isnan(self.best_value):
            return "none yet"
        return f"{self.best_value:.4f} at step {self.best_step}"


def periodic_evaluation(every: int, evaluate, metrics) -> PeriodicEvaluation | None:
    """The trainer's evaluation schedule for ``TrainConfig.eval_every``: None when it is 0."""
    if every == 0:
        return None
    if evaluate is None:
        raise ValueError(
            f"eval_every={every} needs an evaluate callable (a validation set); pass "
            "Trainer(..., evaluate=..., metrics=...) or set eval_every=0"
        )
    return PeriodicEvaluation(evaluate, metrics, every)


def coco_evaluator(dataset, batch_size: int = 8) -> Callable[[Module], dict[str, float]]:
    """``model -> {"segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50"}`` on ``dataset`` (a
    ``CocoDataset`` or ``ShapesDataset``): predictions scored by ``evaluate.evaluate_coco``
    without printing. Checks up front that pycocotools is installed."""
    from .data.coco import import_pycocotools
    from .evaluate import evaluate_coco, predictions_to_coco_results

    import_pycocotools()  # fail before training, not at the first evaluation
    if len(dataset) == 0:
        raise ValueError("the validation set is empty; give --val-data with images in it")
    gt = dataset.coco if hasattr(dataset, "coco") else dataset

    def evaluate(model: Module) -> dict[str, float]:
        predictions, image_ids = [], []
        for start in range(0, len(dataset), batch_size):
            batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            predictions.extend(model.predict([item["image"] for item in batch]))
            image_ids.extend(int(item["image_id"]) for item in batch)
        results = predictions_to_coco_results(predictions, image_ids, dataset.label_to_category_id)
        metrics = evaluate_coco(gt, results, print_table=False, image_ids=image_ids)
        return {f"{t}_{k}": metrics[t][k] for t in ("segm", "bbox") for k in ("AP", "AP50")}

    return evaluate
