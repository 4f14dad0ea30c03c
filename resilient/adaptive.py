"""
The adaptive circuit breaker: a basic breaker that also learns to predict failures.

``circuit_breaker: {type: adaptive}`` builds an :class:`AdaptiveCircuitBreaker`
instead of a :class:`~resilient.breaker.CircuitBreaker`. It *is* the basic breaker
(same trips, same half-open, same tokens), plus:

* **Per call**, on the common success path, nothing beyond the basic breaker: a
  success is counted by the basic breaker's own lock-free counter, and the
  bucket's figures are read from its totals once per bucket. The first
  ``_SAMPLES`` calls of each bucket are measured (a latency histogram bin each,
  recorded on the basic breaker's locked path, just before it takes its lock);
  failures, timeouts and rejections are counted as they happen (they take the
  lock in the basic breaker too).
* **Per time bucket** (``adaptive.bucket_seconds``, 1 s by default), on the first
  call after the bucket ends (the lock-free success path ends at the bucket's
  edge, so that call reaches the breaker's lock): one feature row (:data:`FEATURES`), and, when a
  model trained on at least ``min_samples`` buckets is there, one prediction of
  the probability that the service fails within ``horizon_seconds``.
* **Per retrain period**, in a background thread: a scikit-learn
  ``RandomForestClassifier`` fitted on the process's own history (warm-started
  from a saved model, see :func:`save_model`, or one trained on simulated
  histories by ``resilient._adaptive_bootstrap.bootstrap_model``).

What it does with the prediction (``adaptive.mode``): ``shadow`` reports it and
never acts; ``active`` sheds a share of the calls that grows with the risk
(``action: shed``) or opens the breaker early (``action: open``) while the risk
is above ``prediction_threshold``, and is the basic breaker below it.
``throttle`` needs no model: it is Google SRE's client-side adaptive
throttling (:class:`ThrottlingCircuitBreaker`).

The adaptive counters are updated without a lock of their own: from many threads
at once an update may be lost now and then, which moves a statistic by a call and
never a decision of the basic breaker (those stay under its lock). With a shared (Redis) backend the
breaker's state is the fleet's, but the prediction and the shedding are this
process's own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

from resilient._models import CircuitBreakerConfig
from resilient.breaker import _TOKEN_PASS, STATE_CLOSED, STATE_OPEN, CircuitBreaker, Mode
from resilient.errors import AttemptTimeoutError, CircuitOpenError
from resilient.events import PredictionCrossed, bus

if TYPE_CHECKING:
    from resilient.backends.protocol import Backend

__all__ = [
    "FEATURES",
    "AdaptiveCircuitBreaker",
    "Forest",
    "ThrottlingCircuitBreaker",
    "load_model",
    "make",
    "recording",
    "save_model",
    "train",
]

_log = logging.getLogger("resilient.adaptive")

#: The features of one time bucket, in the order of a row.
FEATURES: Final = (
    "error_rate",  # failures / settled calls in the bucket
    "error_rate_3",  # the same over the last 3 buckets
    "error_trend",  # error rate now minus its mean over the 10 buckets before
    "timeout_share",  # AttemptTimeoutError / settled calls
    "rejection_share",  # refused / requested (breaker open, shedding, half-open full)
    "latency_p50",  # log2(p50 / the healthy baseline p50)
    "latency_p90",  # log2(p90 / the healthy baseline p50)
    "latency_p50_trend",  # latency_p50 now minus 5 buckets ago
    "latency_p90_trend",  # latency_p90 now minus 5 buckets ago
    "concurrency",  # log2(mean calls in flight / its healthy baseline), by Little's law
    "throughput",  # log2(requests / its healthy baseline)
    "not_closed",  # 1 while the breaker is open or half-open
)
_N: Final = len(FEATURES)
_FORMAT: Final = 1  # version of what save_model writes

# Latency histogram: bin i holds durations in [1e-4 * 2**(i/2), 1e-4 * 2**((i+1)/2)),
# 100 us to ~ 1e-4 * 2**24 s = 28 min; two bins per octave is enough for ratios.
_BINS: Final = 48
_BIN0: Final = 1e-4
_HIST_EMPTY: Final = (0,) * _BINS
# The trends look 10 buckets back; after a longer idle stretch they start again.
_IDLE_RESET: Final = 10
# Calls measured per bucket for the latency features: enough for a p90 on a
# histogram of two bins per octave, few enough that a busy service pays for
# them on a tiny share of its calls (the rest take the basic breaker's path).
_SAMPLES: Final = 64
# The concurrency feature's floor (mean calls in flight): log2 of a ratio
# needs a positive value, and less than this is "idle" whatever the baseline.
_CONC_FLOOR: Final = 0.01

_TRAINING_SYNC = False  # tests and benchmarks: train on the calling thread
_recorders: list[list[AdaptiveCircuitBreaker]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[AdaptiveCircuitBreaker]]:
    """
    Collect every adaptive breaker built inside the block (and train synchronously).

    ``resilient.testing.simulate`` builds its breaker inside an isolated
    registry; this is how a benchmark or a test reaches it afterwards, e.g. for
    its :meth:`AdaptiveCircuitBreaker.dataset`. Training inside the block runs
    on the calling thread, so a run in virtual time stays deterministic.
    """
    global _TRAINING_SYNC
    made: list[AdaptiveCircuitBreaker] = []
    _recorders.append(made)
    before = _TRAINING_SYNC
    _TRAINING_SYNC = True
    try:
        yield made
    finally:
        _TRAINING_SYNC = before
        _recorders.remove(made)


# --------------------------------------------------------------------------- the model


class Forest:
    """
    A fitted ``RandomForestClassifier`` and what it was trained on.

    :meth:`risk` walks the fitted trees' arrays in pure Python instead of calling
    ``predict_proba``: scikit-learn's prediction has a fixed cost of about a
    millisecond per call (input validation, a joblib dispatch), too much for a
    call path, while walking 30 trees of depth 10 for one row costs tens of
    microseconds. A test checks both give the same probabilities.
    """

    __slots__ = ("_trees", "classifier", "samples", "trained_at")

    def __init__(self, classifier: Any, samples: int, trained_at: float) -> None:
        self.classifier = classifier
        self.samples = samples
        self.trained_at = trained_at  # wall-clock time (time.time())
        classes = [int(c) for c in classifier.classes_]
        if sorted(classes) != [0, 1]:
            # a forest that saw one class only answers it for every row: after an
            # outage at start-up, "failing" for ever (until the next retraining)
            msg = f"a model needs both labels, 0 and 1, to predict; it saw {classes}"
            raise ValueError(msg)
        self._trees: list[tuple[list[int], list[int], list[int], list[float], list[float]]] = []
        col = classes.index(1)
        for est in classifier.estimators_:
            t = est.tree_
            values = t.value[:, 0, :]
            totals = values.sum(axis=1)
            totals[totals == 0] = 1.0
            probs = (values[:, col] / totals).tolist()
            self._trees.append(
                (
                    t.children_left.tolist(),
                    t.children_right.tolist(),
                    t.feature.tolist(),
                    t.threshold.tolist(),
                    probs,
                )
            )

    def risk(self, row: Sequence[float]) -> float:
        """Probability (0..1) that the service fails within the horizon, given *row*."""
        trees = self._trees
        total = 0.0
        for left, right, feature, threshold, probs in trees:
            node = 0
            while left[node] != -1:
                node = left[node] if row[feature[node]] <= threshold[node] else right[node]
            total += probs[node]
        return total / len(trees)


def train(
    rows: Sequence[Sequence[float]],
    labels: Sequence[int],
    *,
    n_estimators: int = 30,
    seed: int = 0,
) -> Forest:
    """
    Fit a random forest on feature *rows* (see :data:`FEATURES`) and 0/1 *labels*.

    Raises:
        ImportError: scikit-learn is not installed (the ``ml`` extra).
        ValueError: No rows, rows of the wrong width, or labels that are not both
            0 and 1 (a forest that saw one class answers it for every row).
    """
    if not rows:
        msg = "train() needs at least one row"
        raise ValueError(msg)
    if any(len(r) != _N for r in rows):
        msg = f"every row needs {_N} features ({', '.join(FEATURES)})"
        raise ValueError(msg)
    if sorted(set(labels)) != [0, 1]:
        msg = "train() needs both labels: 0 (healthy) and 1 (failed soon after)"
        raise ValueError(msg)
    from sklearn.ensemble import RandomForestClassifier  # type: ignore[import-untyped]

    clf = RandomForestClassifier(
        n_estimators=n_estimators,
        max_depth=10,
        min_samples_leaf=3,
        class_weight="balanced",
        random_state=seed,
        n_jobs=1,
    )
    clf.fit([list(r) for r in rows], list(labels))
    return Forest(clf, len(rows), time.time())


def save_model(model: Forest, path: str) -> None:
    """Save *model* with joblib, to start adaptive breakers from (``adaptive.model_path``)."""
    import joblib  # type: ignore[import-untyped]

    joblib.dump(
        {
            "format": _FORMAT,
            "features": FEATURES,
            "classifier": model.classifier,
            "samples": model.samples,
            "trained_at": model.trained_at,
        },
        path,
    )


def load_model(path: str) -> Forest:
    """
    Load a model written by :func:`save_model`.

    Raises:
        OSError: The file cannot be read.
        ValueError: It is not such a model, or was made for other features.
    """
    import joblib

    data = joblib.load(path)
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        msg = f"{path}: not a model saved by resilient.adaptive.save_model"
        raise ValueError(msg)
    if tuple(data.get("features", ())) != FEATURES:
        msg = f"{path}: the model was trained on other features; train it again"
        raise ValueError(msg)
    return Forest(data["classifier"], int(data["samples"]), float(data["trained_at"]))


# --------------------------------------------------------------------------- helpers


def _quantile(hist: Sequence[int], n: int, q: float) -> float:
    """The *q* quantile of *n* durations in *hist* (the geometric middle of its bin)."""
    rank = q * n
    seen = 0
    for i, count in enumerate(hist):
        seen += count
        if seen >= rank and count:
            return _BIN0 * 2 ** ((i + 0.5) / 2)
    return _BIN0 * 2 ** ((_BINS - 0.5) / 2)


def _log2_ratio(value: float, base: float) -> float:
    if value <= 0 or base <= 0:
        return 0.0
    return math.log2(value / base)


class _Bucket:
    """The counters of the current bucket, plus what a row needs from the ones before."""

    __slots__ = ("base_conc", "base_p50", "base_req", "recent")

    def __init__(self) -> None:
        self.base_p50 = 0.0  # healthy baselines: moving averages over buckets without failures
        self.base_req = 0.0
        self.base_conc = 0.0
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=11)  # err, l50, l90


# --------------------------------------------------------------------------- the breaker


class AdaptiveCircuitBreaker(CircuitBreaker):
    """
    A :class:`~resilient.breaker.CircuitBreaker` that predicts failures (``type: adaptive``).

    Below ``prediction_threshold``, or without a model trained on ``min_samples``
    buckets, it behaves exactly as the basic breaker. See the module docstring
    and docs/adaptive.md.
    """

    __slots__ = (
        "_acting",
        "_adaptive",
        "_bucket",
        "_c_fail",
        "_c_lat",
        "_c_pass",
        "_c_sampled",
        "_c_shed",
        "_c_timeout",
        "_closed_counts",
        "_crossings",
        "_early",
        "_edge",
        "_flags",
        "_hist",
        "_idx",
        "_inline",
        "_label_rate",
        "_last_failed",
        "_last_healthy",
        "_last_train",
        "_mark_ok",
        "_mark_rej",
        "_model",
        "_model_error",
        "_open_unlearned",
        "_opened",
        "_predictions",
        "_risk",
        "_roll_lock",
        "_rows",
        "_shed",
        "_shed_reason",
        "_training",
        "_uses_model",
        "_width",
    )

    #: whether the shedding is the model's (it ends with a transition) or the
    #: throttle's (it is the window's, whatever the state)
    _model_sheds: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig,
        *,
        clock: Callable[[], float] | None = None,
        listeners: Iterable[Any] = (),
        backend: Backend | None = None,
        model: Forest | None = None,
        previous: CircuitBreaker | None = None,
        background: bool = False,
        inline: bool = False,
    ) -> None:
        """
        Create a closed adaptive breaker.

        Args:
            name, config, clock, listeners, backend: As for ``CircuitBreaker``.
            model: A model to start from; default: ``adaptive.model_path``, if given.
            previous: The breaker this one replaces (a policy reload): what it
                learned (history and model) is kept when it still means the same
                (same bucket width, horizon and failure label).
            background: Load ``model_path`` in a background thread (the breaker is
                the basic one until it is loaded) instead of in the constructor:
                importing scikit-learn and unpickling a forest takes about a
                second, too long for the first call of a decorated function.
            inline: Load the model and train on the calling thread (a breaker
                in virtual time: a thread would finish at a random virtual
                moment, or after the simulated run, and the same seed would
                not give the same result).
        """
        self._shed = 0.0  # read by _sync_tokens, which the base's __init__ calls
        self._edge = -math.inf
        super().__init__(name, config, clock=clock, listeners=listeners, backend=backend)
        a = config.adaptive
        self._adaptive = a
        # latency features: measured for the first _SAMPLES calls of each bucket
        # (needs_duration is read per call, `measures` by steps built once)
        self.needs_duration = self.measures = True
        self._shed_reason = "shedding calls on a predicted failure"
        self._uses_model = config.uses_model
        self._width = a.bucket_seconds
        rate = config.failure_rate_threshold if config.failure_rate_threshold is not None else 0.5
        # A bucket "fails" at half the breaker's own failure-rate threshold: the
        # label should fire before the breaker would trip, not with it.
        self._label_rate = rate / 2
        self._idx = -1  # absolute index of the current bucket (-1: none yet)
        # per bucket: failures, timeouts, shed calls, measured calls and their sum;
        # successes and rejections are the basic breaker's totals minus these marks
        self._c_fail = self._c_timeout = self._c_shed = self._c_sampled = 0
        # successes in `disabled` mode, which the basic breaker does not count
        # (its failures are counted here as usual: the rows stay the service's)
        self._c_pass = 0
        self._c_lat = 0.0
        self._mark_ok = self._mark_rej = 0
        self._closed_counts = (0, 0)  # the last closed bucket's requests and successes
        self._hist = list(_HIST_EMPTY)
        self._bucket = _Bucket()
        self._rows: deque[tuple[int, tuple[float, ...]]] = deque(maxlen=a.history_buckets)
        self._flags: dict[int, bool] = {}  # bucket index -> it failed
        self._risk: float | None = None
        self._acting = False
        # the breaker is open, but not on failures this process saw: an early opening
        # by its model, or one adopted from another process that its calls did not
        # show (with a shared backend); not a failure label (see _close_bucket)
        # (already set if the backend's thread adopted an open fleet state meanwhile)
        self._open_unlearned = getattr(self, "_open_unlearned", False)
        self._opened: tuple[str, str] | None = None  # an early opening to notify
        self._predictions = 0
        self._crossings: deque[tuple[float, float, bool]] = deque(maxlen=100)
        self._roll_lock = threading.Lock()
        self._training: threading.Thread | None = None
        self._last_train = self._clock()
        # before the first usable model: the latest failed / healthy bucket, and the
        # bucket when training was last tried early (see _maybe_train)
        self._last_failed = self._last_healthy = -1
        self._early = -math.inf
        self._model_error: str | None = None
        self._model: Forest | None = model
        self._inline = inline
        if isinstance(previous, AdaptiveCircuitBreaker) and self._uses_model:
            self._inherit(previous)
        if self._model is None and a.model_path is not None and self._uses_model:
            if background and not (inline or _TRAINING_SYNC):
                # the training slot: no retraining starts before the model is there
                self._training = threading.Thread(
                    target=self._load_model,
                    name=f"resilient-adaptive-{name}-load",
                    daemon=True,
                )
                self._training.start()
            else:
                self._load_model()
        for made in _recorders:
            made.append(self)

    def _load_model(self) -> None:
        path = self._adaptive.model_path
        assert path is not None
        try:
            model = load_model(path)
        except Exception as exc:  # a bad file must not break the calls: report it
            self._model_error = f"{type(exc).__name__}: {exc}"
            _log.error(
                "adaptive breaker %r: cannot load model %r (%s); learning from scratch",
                self.name,
                path,
                self._model_error,
            )
            return
        current = self._model
        if current is None or current.samples < model.samples:
            self._model = model

    def wait_for_model(self, timeout: float | None = None) -> bool:
        """
        Wait until a ``model_path`` loading in the background is loaded (or failed).

        A breaker built by a policy loads its saved model in a background thread,
        so that the first call does not wait for scikit-learn; until then it is the
        basic breaker. Call this at start-up to be predicting from the first call.

        Returns:
            Whether a model is there.
        """
        thread = self._training
        if thread is not None and thread.name.endswith("-load"):
            thread.join(timeout)
        return self._model is not None

    def _inherit(self, previous: AdaptiveCircuitBreaker) -> None:
        """Keep what *previous* learned, if its rows and labels mean the same here."""
        old, new = previous._adaptive, self._adaptive
        if (
            old.bucket_seconds != new.bucket_seconds
            or old.horizon_seconds != new.horizon_seconds
            or previous._label_rate != self._label_rate
        ):
            return
        if previous._uses_model and old.model_path == new.model_path:
            self._model = previous._model
            self._model_error = previous._model_error
        if previous._clock is not self._clock:
            return  # bucket indexes of another clock
        with previous._roll_lock:
            self._rows.extend(previous._rows)
            self._flags = dict(previous._flags)
            b, old_b = self._bucket, previous._bucket  # a copy: old pipelines may still call
            b.base_p50, b.base_req, b.base_conc = old_b.base_p50, old_b.base_req, old_b.base_conc
            b.recent.extend(old_b.recent)
            self._last_train = previous._last_train
            self._last_failed = previous._last_failed
            self._last_healthy = previous._last_healthy

    # ------------------------------------------------------------------ hot path
    #
    # No acquire() or on_success() of its own: the basic breaker's are the common
    # path (a closed breaker hands out its token; a success is one lock-free
    # increment). What this class needs reaches the methods below: the
    # lock-free success path ends at the bucket's edge and while the bucket's
    # latency samples are taken (_lockfree_until), and the fast token is off
    # while calls are shed and open rejections take the slow path
    # (_sync_tokens), so the bucket rolls on time whatever the calls do.

    def _lockfree_until(self) -> float:
        if self.needs_duration:
            return -math.inf  # sampling: every success comes here, measured
        edge = self._window.edge
        return edge if edge < self._edge else self._edge

    def _sync_tokens(self) -> None:
        CircuitBreaker._sync_tokens(self)
        self._reject_open = False  # rejections count, and roll buckets, in _acquire_slow
        if self._shed:
            self._fast_token = -1

    def _set_shed(self, share: float) -> None:
        """Shed *share* of the calls from now on (0: none); the roll lock is held."""
        if share != self._shed:
            with self._lock:
                self._shed = share
                self._sync_tokens()

    def _acquire_slow(self, shared: bool = True) -> int:
        now = self._clock()
        if now >= self._edge:
            self._roll(now)
        shed = self._shed
        if shed and shared and random.random() < shed and self._mode == "normal":
            # not a rejection for the rejection_share feature: it must not feed
            # on the shedding (the rejections' total minus these)
            self._c_shed += 1
            next(self._rejections)
            raise CircuitOpenError.fast(self.name, self._width, self._shed_reason)
        return CircuitBreaker._acquire_slow(self, shared)

    def _sample(self, duration: float) -> None:
        """One measured duration into the bucket's latency histogram."""
        if duration > _BIN0:
            i = int(math.log2(duration / _BIN0) * 2)
            self._hist[i if i < _BINS else _BINS - 1] += 1
        else:
            self._hist[0] += 1
        self._c_lat += duration
        n = self._c_sampled + 1
        self._c_sampled = n
        if n >= _SAMPLES and self.config.slow_call_duration is None:
            # the rest of the bucket: the basic path (untimed, unless the basic
            # breaker itself times every call to count slow ones)
            self.needs_duration = False

    def _success_locked(self, token: int, duration: float, now: float | None) -> None:
        if now is None or not self._timed:
            now = self._clock()
        if now >= self._edge:
            self._roll(now)
        if duration >= 0.0:
            self._sample(duration)
        if token == _TOKEN_PASS:
            self._c_pass += 1
        CircuitBreaker._success_locked(self, token, duration, now if self._timed else None)

    def on_failure(self, token: int, exc: BaseException, duration: float) -> None:
        """As :meth:`CircuitBreaker.on_failure`, plus the bucket's counters."""
        ignore = self._ignore
        if (ignore and isinstance(exc, ignore)) or not isinstance(exc, self._record):
            CircuitBreaker.on_failure(self, token, exc, duration)  # ignored, or a success
            return
        now = self._clock()
        if now >= self._edge:
            self._roll(now)
        self._c_fail += 1
        if isinstance(exc, AttemptTimeoutError):
            self._c_timeout += 1
        if duration >= 0.0:
            self._sample(duration)
        CircuitBreaker.on_failure(self, token, exc, duration)

    # ------------------------------------------------------------- per bucket

    def _roll(self, now: float) -> None:
        """
        The current bucket is over at *now*: one feature row, one prediction (once
        per bucket). Called without the breaker's lock.
        """
        if not self._roll_lock.acquire(blocking=False):
            return  # another thread is rolling; this call counts in the old bucket
        crossed: PredictionCrossed | None = None
        opened: tuple[str, str] | None = None
        try:
            if now < self._edge:
                return
            idx = int(now // self._width)
            if self._idx >= 0:
                crossed = self._close_bucket(idx - self._idx - 1)
                opened, self._opened = self._opened, None
            else:
                self._take_counts()  # the totals so far belong to no bucket
            self._idx = idx
            self._edge = (idx + 1) * self._width
            self.needs_duration = True  # the new bucket's latency samples
        finally:
            self._roll_lock.release()
        # listeners and subscribers are user code: never under the roll lock
        if crossed is not None and bus.active:
            bus.emit(crossed)
        if opened is not None:
            self._notify((opened,))
        self._maybe_train(now)  # outside the lock: training reads the history under it

    def _counts(self) -> tuple[int, int]:
        """Successes and rejections so far (the basic breaker's totals); lock held."""
        self._fold()
        return self._n_successes, self._rejection_count()

    def _take_counts(self) -> tuple[int, int, int]:
        """
        The current bucket's successes, failures and rejections (shed calls
        included), and its counters back to zero; roll lock held.
        """
        with self._lock:
            ok_total, rej_total = self._counts()
        # totals may restart from zero (reset()): then they are all this bucket's
        ok = ok_total - self._mark_ok if ok_total >= self._mark_ok else ok_total
        rej = rej_total - self._mark_rej if rej_total >= self._mark_rej else rej_total
        self._mark_ok, self._mark_rej = ok_total, rej_total
        ok += self._c_pass
        fail = self._c_fail
        self._c_fail = self._c_pass = 0
        return ok, fail, rej

    def _close_bucket(self, skipped: int) -> PredictionCrossed | None:
        """Close the current bucket, followed by *skipped* buckets without a call."""
        ok, fail, rej_all = self._take_counts()
        timeouts, shed = self._c_timeout, self._c_shed
        hist, lat = self._hist, self._c_lat
        # the histogram's own count: a sample racing with this close may have
        # bumped _c_sampled but not the new histogram (or the other way round)
        sampled = sum(hist)
        self._c_timeout = self._c_shed = self._c_sampled = 0
        self._c_lat = 0.0
        self._hist = list(_HIST_EMPTY)
        calls = ok + fail
        req = calls + rej_all  # every call asked for, shed ones included
        rej = rej_all - shed if rej_all >= shed else 0
        self._closed_counts = (req, ok)
        b = self._bucket
        err = fail / calls if calls else 0.0
        p50 = _quantile(hist, sampled, 0.5) if sampled else 0.0
        p90 = _quantile(hist, sampled, 0.9) if sampled else 0.0
        # mean calls in flight (Little's law): the calls' total time over the bucket's
        conc = max(calls * (lat / sampled) / self._width if sampled else 0.0, _CONC_FLOOR)
        state = self._state
        healthy = calls >= 3 and err < self._label_rate / 2 and state == STATE_CLOSED
        if healthy:
            # moving averages of the healthy service (about the last 30 healthy buckets)
            if b.base_p50 == 0.0:
                b.base_p50, b.base_req, b.base_conc = p50, float(req), conc
            else:
                b.base_p50 += (p50 - b.base_p50) / 30
                b.base_req += (req - b.base_req) / 30
                b.base_conc += (conc - b.base_conc) / 30
        l50 = _log2_ratio(p50, b.base_p50) if calls else 0.0
        l90 = _log2_ratio(p90, b.base_p50) if calls else 0.0
        recent = b.recent
        errs = [e for e, _, _ in recent]
        err3 = (err + sum(errs[-2:])) / (1 + len(errs[-2:]))
        err_trend = err - (sum(errs) / len(errs) if errs else err)
        l50_old, l90_old = (recent[-5][1], recent[-5][2]) if len(recent) >= 5 else (l50, l90)
        row = (
            err,
            err3,
            err_trend,
            timeouts / calls if calls else 0.0,
            rej / req if req else 0.0,
            l50,
            l90,
            l50 - l50_old,
            l90 - l90_old,
            _log2_ratio(conc, b.base_conc),
            _log2_ratio(req, b.base_req) if req else -8.0,
            0.0 if state == STATE_CLOSED else 1.0,
        )
        recent.append((err, l50, l90))
        idx = self._idx
        # The label source: did this bucket fail? Failures seen, or the basic breaker
        # open after its own trip (its rejections stand for the failures it spares).
        failed = (calls >= 3 and err >= self._label_rate) or (
            state == STATE_OPEN and not self._open_unlearned and rej >= max(req // 2, 1)
        )
        self._flags[idx] = failed
        if failed:
            self._last_failed = idx
        else:
            self._last_healthy = idx
        self._rows.append((idx, row))
        if len(self._flags) > 2 * self._rows.maxlen:  # type: ignore[operator]
            oldest = self._rows[0][0]
            self._flags = {k: v for k, v in self._flags.items() if k >= oldest}
        if skipped >= _IDLE_RESET:
            # idle for longer than the trends look back: they would compare with a
            # service long gone. Shorter gaps (a service called less often than
            # once a bucket) keep them, else such a service would never predict.
            recent.clear()
        return self._predict(row)

    def _predict(self, row: tuple[float, ...]) -> PredictionCrossed | None:
        model = self._model
        if (
            not self._uses_model
            or model is None
            or model.samples < self._adaptive.min_samples
            or len(self._bucket.recent) < 3
        ):
            self._stand_down()
            return None
        risk = model.risk(row)
        self._risk = risk
        self._predictions += 1
        thr = self.config.prediction_threshold
        above = risk > thr
        crossed = None
        if above != self._acting:
            crossed = PredictionCrossed(self.name, risk, thr, above, self._adaptive.mode)
            self._crossings.append((self._clock(), risk, above))
        self._acting = above
        if self._adaptive.mode != "active":
            return crossed
        if not above:
            self._set_shed(0.0)
            return crossed
        if self._adaptive.action == "shed":
            # a share of the calls growing with the risk: a quarter of max_shed at the
            # threshold, all of it at risk 1; only while closed (half-open is the trials')
            grow = (risk - thr) / (1.0 - thr) if thr < 1.0 else 1.0
            share = self._adaptive.max_shed * (0.25 + 0.75 * grow)
            # and only in normal mode: disabled and metrics_only never refuse a call
            normal = self._state == STATE_CLOSED and self._mode == "normal"
            self._set_shed(share if normal else 0.0)
        elif self._state == STATE_CLOSED:
            self._open_early()
        return crossed

    def _stand_down(self) -> None:
        self._risk = None
        self._set_shed(0.0)
        self._acting = False

    def _open_early(self) -> None:
        """Open now (roll lock held); ``_roll`` notifies the listeners after releasing it."""
        with self._lock:
            if self._state != STATE_CLOSED or self._mode != "normal":
                return
            self._opened = self._transition(STATE_OPEN, self._clock())
            self._open_unlearned = True

    def _set_mode(self, mode: Mode) -> None:
        if mode != "normal":
            self._shed = 0.0  # disabled / metrics_only never refuse; forced_open refuses all
        CircuitBreaker._set_mode(self, mode)

    def _transition(self, new: str, now: float, *, remote: bool = False) -> tuple[str, str]:
        # An opening adopted from the fleet (a shared backend) carries no reason: it
        # may be another process's model opening early. Learning it as a failure
        # would teach this process's model its peers' predictions, and the fleet
        # would feed on itself; so it is a failure label only when this process's
        # own calls failed within the horizon before it (a trip it saw coming too).
        unlearned = remote and new == STATE_OPEN and not self._saw_failure()
        if self._model_sheds:
            self._shed = 0.0  # a prediction's shedding ends with the state it was made in
        event = CircuitBreaker._transition(self, new, now, remote=remote)
        self._open_unlearned = unlearned
        return event

    def _saw_failure(self) -> bool:
        """Whether this process's calls failed in the current bucket or the horizon before."""
        try:
            ok_total, _ = self._counts()  # the lock is held (a transition)
            fail = self._c_fail
            ok = ok_total - self._mark_ok if ok_total >= self._mark_ok else ok_total
            calls = ok + self._c_pass + fail
            if calls >= 3 and fail >= self._label_rate * calls:
                return True
            h = math.ceil(self._adaptive.horizon_seconds / self._width)
            return self._last_failed >= 0 and self._idx - self._last_failed <= h
        except AttributeError:
            # the backend's thread adopted the fleet's state while __init__ (after
            # the base class attached to the backend) has not set the counters yet
            return False

    # ------------------------------------------------------------- training

    def dataset(self) -> tuple[list[tuple[float, ...]], list[int]]:
        """
        The labelled history: one feature row per bucket whose horizon is over, and
        whether the service failed in the ``horizon_seconds`` after it (1) or not (0).
        """
        h = max(1, math.ceil(self._adaptive.horizon_seconds / self._width))
        with self._roll_lock:
            rows = list(self._rows)
            flags = dict(self._flags)
            last = self._idx
        xs: list[tuple[float, ...]] = []
        ys: list[int] = []
        for idx, row in rows:
            if idx + h >= last:
                break  # the horizon is not over yet
            xs.append(row)
            ys.append(int(any(flags.get(j, False) for j in range(idx + 1, idx + h + 1))))
        return xs, ys

    def train_now(self) -> bool:
        """
        Retrain the model from the history now, on this thread (tests, benchmarks).

        Returns:
            Whether a model was trained (it needs ``min_samples`` labelled buckets,
            and both labels among them: failures and health).
        """
        xs, ys = self.dataset()
        if len(xs) < self._adaptive.min_samples or not self._uses_model:
            return False
        if not 0 < sum(ys) < len(ys):
            return False  # only failures, or only health, so far: nothing to tell apart
        previous = self._model
        if previous is not None and previous.samples > len(xs):
            # warm start: the saved model's samples are not here; keep it until the
            # process's own history is larger
            return False
        self._model = train(xs, ys, n_estimators=self._adaptive.n_estimators)
        return True

    def _maybe_train(self, now: float) -> None:
        if not self._uses_model or (self._training is not None and self._training.is_alive()):
            return
        a = self._adaptive
        if now - self._last_train < a.retrain_seconds:
            # Not due; but a breaker with no usable model trains as soon as its
            # history holds min_samples labelled buckets and has seen the service
            # both fail and work, not a retrain period later. Until it succeeds
            # (a label matures a horizon after its bucket), tried once per horizon.
            model = self._model
            h = math.ceil(a.horizon_seconds / self._width)
            if (
                (model is not None and model.samples >= a.min_samples)
                or self._last_failed < 0
                or self._last_healthy < 0
                or self._idx - self._early < h
                or len(self._rows) < a.min_samples + h
            ):
                return
            self._early = self._idx
        self._last_train = now
        if self._inline or _TRAINING_SYNC:
            self._train_quietly()
            return
        thread = threading.Thread(
            target=self._train_quietly, name=f"resilient-adaptive-{self.name}", daemon=True
        )
        self._training = thread
        thread.start()

    def _train_quietly(self) -> None:
        try:
            self.train_now()
        except Exception:
            _log.exception("adaptive breaker %r: training failed; keeping the model", self.name)

    # ------------------------------------------------------------- status

    def _loading(self) -> bool:
        thread = self._training
        return thread is not None and thread.name.endswith("-load") and thread.is_alive()

    @property
    def predicted_risk(self) -> float | None:
        """The last predicted failure probability (``None``: not predicting)."""
        return self._risk

    @property
    def crossings(self) -> list[tuple[float, float, bool]]:
        """The last 100 threshold crossings: (clock time, risk, went above)."""
        return list(self._crossings)

    @property
    def model(self) -> Forest | None:
        """The model predicting now (``None``: none yet)."""
        return self._model

    @property
    def shed_share(self) -> float:
        """Share of calls refused by shedding now (0 unless ``active`` and at risk)."""
        return self._shed

    def get_status(self) -> dict[str, Any]:
        """:meth:`CircuitBreaker.get_status`, plus an ``adaptive`` entry."""
        status = super().get_status()
        a = self._adaptive
        model = self._model
        status["adaptive"] = {
            "type": "adaptive",
            "mode": a.mode,
            "action": a.action if a.mode == "active" else None,
            "ml": self._uses_model,
            "predicting": self._risk is not None,
            "predicted_risk": self._risk,
            "prediction_threshold": self.config.prediction_threshold,
            "acting": self._acting and a.mode == "active",
            "shed_share": self._shed,
            "model_age_seconds": (
                round(max(time.time() - model.trained_at, 0.0), 3) if model is not None else None
            ),
            "model_samples": model.samples if model is not None else 0,
            "min_samples": a.min_samples,
            "history_buckets": len(self._rows),
            "predictions": self._predictions,
            "model_error": self._model_error,
            "model_loading": self._loading(),
        }
        return status

    def __repr__(self) -> str:
        return (
            f"<AdaptiveCircuitBreaker {self.name!r} {self._state} "
            f"mode={self._adaptive.mode} risk={self._risk}>"
        )


class ThrottlingCircuitBreaker(AdaptiveCircuitBreaker):
    """
    ``adaptive: {mode: throttle}``: Google SRE client-side adaptive throttling on
    top of the basic breaker.

    Each call is refused locally with probability
    ``max(0, (requests - K * accepts) / (requests + 1))`` over the last
    ``throttle_window`` seconds, where *requests* counts every call asked for
    (refused ones included) and *accepts* the calls that succeeded. No model.
    The window is made of the finished buckets, and the probability is
    recomputed once per bucket: while it is zero a call costs what it costs
    through the basic breaker.
    """

    __slots__ = ("_k", "_ring", "_w_acc", "_w_req")

    _model_sheds: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig,
        *,
        clock: Callable[[], float] | None = None,
        listeners: Iterable[Any] = (),
        backend: Backend | None = None,
        inline: bool = False,
    ) -> None:
        super().__init__(
            name, config, clock=clock, listeners=listeners, backend=backend, inline=inline
        )
        a = config.adaptive
        self._shed_reason = "throttling calls client-side"
        self._k = a.k
        n = max(1, math.ceil(a.throttle_window / a.bucket_seconds))
        self._ring: deque[tuple[int, int]] = deque(maxlen=n)
        self._w_req = 0  # the window's finished buckets
        self._w_acc = 0

    def throttle_probability(self) -> float:
        """The probability that the next call is refused locally."""
        req = self._w_req
        return max(0.0, (req - self._k * self._w_acc) / (req + 1))

    def _push(self, req: int, acc: int) -> None:
        ring = self._ring
        if len(ring) == ring.maxlen:
            old_req, old_acc = ring[0]
            self._w_req -= old_req
            self._w_acc -= old_acc
        ring.append((req, acc))
        self._w_req += req
        self._w_acc += acc

    def _close_bucket(self, skipped: int) -> PredictionCrossed | None:
        crossed = super()._close_bucket(skipped)
        # the window slides over the buckets without a call too: they are empty,
        # not the end of the window (a service called less often than once a
        # bucket keeps its requests and accepts for throttle_window seconds)
        self._push(*self._closed_counts)
        ring = self._ring
        if ring.maxlen is not None and skipped >= ring.maxlen:
            ring.clear()
            self._w_req = self._w_acc = 0
        else:
            for _ in range(skipped):
                self._push(0, 0)
        # the probability is the window's, recomputed once per bucket: a call
        # pays for it only while it is above zero (then it takes the slow path)
        self._set_shed(self.throttle_probability())
        return crossed

    def get_status(self) -> dict[str, Any]:
        """:meth:`AdaptiveCircuitBreaker.get_status`, plus the throttling figures."""
        status = super().get_status()
        status["adaptive"]["throttle"] = {
            "k": self._k,
            "window_seconds": self._adaptive.throttle_window,
            "requests": self._w_req,
            "accepts": self._w_acc,
            "probability": round(self.throttle_probability(), 6),
        }
        return status


def make(
    name: str,
    config: CircuitBreakerConfig,
    *,
    clock: Callable[[], float] | None = None,
    listeners: Iterable[Any] = (),
    backend: Backend | None = None,
    previous: CircuitBreaker | None = None,
) -> AdaptiveCircuitBreaker:
    """
    The adaptive breaker for *config* (``type: adaptive``): throttling or predicting.

    *previous* is the breaker it replaces on a reload (what it learned is kept, see
    :class:`AdaptiveCircuitBreaker`); a ``model_path`` is loaded in a background thread,
    except in virtual time (*clock* not ``time.monotonic``: ``resilient.testing``,
    ``resilient simulate``), where loading and training run on the calling thread so
    that a simulated run uses its model from the first call and stays reproducible.
    """
    inline = clock is not None and clock is not time.monotonic
    if config.adaptive.mode == "throttle":
        return ThrottlingCircuitBreaker(
            name, config, clock=clock, listeners=listeners, backend=backend, inline=inline
        )
    return AdaptiveCircuitBreaker(
        name,
        config,
        clock=clock,
        listeners=listeners,
        backend=backend,
        previous=previous,
        background=True,
        inline=inline,
    )
