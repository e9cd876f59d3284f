"""The search space: one pruning rate per decoder layer, bounded, with a fixed parameter-weighted mean.

Every candidate, whatever produced it (LLM, mutation, crossover, heuristic), goes through
:meth:`SearchSpace.repair` before it is evaluated, so the constraint is enforced in exactly one place.
The repair is the projection onto ``{x : lo <= x_i <= hi, sum_i w_i x_i = target}`` in the
parameter-weighted norm, which has the closed form ``x_i = clip(y_i + delta, lo, hi)`` for one scalar
``delta``: it moves the candidate as little as possible (in parameters) and keeps its shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import SelfpruneError, option

DEFAULT_BOUNDS = (0.0, 0.8)
# A repair that moves no rate by more than this is "no repair" (floating-point noise).
REPAIR_EPS = 1e-9


@dataclass(frozen=True)
class Repair:
    """A repaired candidate and how far the repair moved it (max and mean absolute change per layer)."""

    rates: list[float]
    max_abs: float
    mean_abs: float

    @property
    def moved(self) -> bool:
        return self.max_abs > REPAIR_EPS


class SearchSpace:
    """Bounds, target and layer weights; builds and repairs feasible rate vectors."""

    def __init__(self, layer_params: Sequence[float], target: float, bounds: Sequence[float] = DEFAULT_BOUNDS):
        if len(layer_params) == 0:
            raise SelfpruneError(f"the model has no decoder layers to prune: check {option('model')}")
        weights = np.asarray(layer_params, dtype=np.float64)
        if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            raise SelfpruneError("every layer needs a positive parameter count: check the model's layers")
        lo, hi = (float(b) for b in bounds)
        if not (0.0 <= lo < hi < 1.0):
            raise SelfpruneError(f"bounds {lo},{hi} are invalid: pass {option('bounds')} LO,HI with 0 <= LO < HI < 1")
        target = float(target)
        if not (0.0 < target < 1.0):
            raise SelfpruneError(f"target {target} is outside (0, 1): pass e.g. {option('target')} 0.3")
        if not (lo - 1e-12 <= target <= hi + 1e-12):
            raise SelfpruneError(
                f"target {target} cannot be reached with per-layer bounds [{lo}, {hi}]: "
                f"widen {option('bounds')} so that LO <= target <= HI"
            )
        self.weights = weights / weights.sum()
        self.layer_params = [int(p) if float(p).is_integer() else float(p) for p in layer_params]
        self.target = target
        self.lo = lo
        self.hi = hi

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    @property
    def equal_weights(self) -> bool:
        return bool(np.allclose(self.weights, self.weights[0], rtol=1e-9, atol=0))

    def mean(self, rates: Sequence[float]) -> float:
        """Parameter-weighted mean rate = fraction of all prunable parameters removed."""
        return float(np.dot(self.weights, np.asarray(rates, dtype=np.float64)))

    def uniform(self) -> list[float]:
        return [self.target] * self.num_layers

    def is_feasible(self, rates: Sequence[float], tol: float = 1e-9) -> bool:
        x = np.asarray(rates, dtype=np.float64)
        return (
            x.shape == self.weights.shape
            and bool(np.all(x >= self.lo - tol))
            and bool(np.all(x <= self.hi + tol))
            and abs(self.mean(x) - self.target) <= tol
        )

    def repair(self, rates: Sequence[float]) -> Repair:
        """Project ``rates`` onto the feasible set; exact to floating-point precision."""
        y = np.asarray(rates, dtype=np.float64)
        if y.shape != self.weights.shape:
            raise ValueError(f"expected {self.num_layers} rates, got {y.shape}")
        if not np.all(np.isfinite(y)):
            raise ValueError("rates must be finite numbers")
        x = np.clip(y + self._shift(y), self.lo, self.hi)
        x = self._polish(x)
        change = np.abs(x - y)
        return Repair(rates=[float(v) for v in x], max_abs=float(change.max()), mean_abs=float(change.mean()))

    def _shift(self, y: np.ndarray) -> float:
        """The scalar delta with sum_i w_i clip(y_i + delta) = target.

        g(delta) is continuous, non-decreasing and piecewise linear with breakpoints at lo - y_i and
        hi - y_i; find the segment that brackets the target and solve the linear piece exactly.
        """
        w, lo, hi, t = self.weights, self.lo, self.hi, self.target

        def g(delta: float) -> float:
            return float(np.dot(w, np.clip(y + delta, lo, hi)))

        points = np.unique(np.concatenate([lo - y, hi - y]))
        values = np.array([g(p) for p in points])
        # values[0] is everything at lo, values[-1] everything at hi; lo <= t <= hi by construction.
        k = int(np.searchsorted(values, t, side="left"))
        if k == 0:
            return float(points[0])
        if k >= len(points):
            return float(points[-1])
        a, b = points[k - 1], points[k]
        ga, gb = values[k - 1], values[k]
        if gb - ga <= 0:
            return float(b)
        return float(a + (t - ga) * (b - a) / (gb - ga))

    def _polish(self, x: np.ndarray) -> np.ndarray:
        """Remove the last floating-point residual by moving the coordinates with room to spare."""
        for _ in range(4):
            residual = self.target - float(np.dot(self.weights, x))
            if abs(residual) <= 1e-15:
                break
            room = (x < self.hi) if residual > 0 else (x > self.lo)
            if not room.any():
                break
            x = x.copy()
            x[room] += residual / float(self.weights[room].sum())
            x = np.clip(x, self.lo, self.hi)
        return x

    def describe(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "target": self.target,
            "bounds": [self.lo, self.hi],
            "layer_params": self.layer_params,
        }


def parse_bounds(text: str) -> tuple[float, float]:
    """Parse ``--bounds LO,HI``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError
    except ValueError:
        raise SelfpruneError(f"--bounds {text!r} is not two numbers: pass e.g. --bounds 0,0.8") from None
    return lo, hi
