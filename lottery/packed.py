"""Packed training: the tickets of one rewind point trained side by side in one compiled step.

Tickets that share a rewind point share their start weights, optimizer state and data order: only
the mask differs (and, for ``random_reinit``, the start weights). On the JAX backend every variable
of a *pack* (the masks included: the optimizer holds them) is stacked with a leading ticket axis,
and one ``jax.jit(jax.vmap(step))`` trains them all on the shared batch. A LeNet step at batch 128
is bound by dispatch on a GPU, not arithmetic: a pack of 20 costs about one step.

Each ticket's artifacts are written exactly as when it trains alone (its slice of the state goes
through the host model and the same `epoch_saver`, so a killed pack resumes ticket by ticket); it
matches its unpacked training within floating-point reassociation (docs/packing.md). A pack that
does not fit (XLA ``RESOURCE_EXHAUSTED``) is halved and retried, with a log line.

No TensorFlow here; jax is imported only on the JAX backend (inside the functions).
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from lottery.phases import phase
from lottery.ticket import Start, Ticket

log = logging.getLogger("lottery")

# Of the accelerator's free memory, the share packs may plan to use (XLA needs working space too).
MEMORY_SHARE = 0.5
# No more tickets in one pack than this by default: beyond it a GPU step stops being dispatch-bound.
MAX_AUTO_PACK = 32


def pack_size(cfg, pack: int | None, tickets: int, model=None) -> int:
    """How many tickets train side by side: ``pack`` (or ``LOTTERY_PACK``) when given, else from
    the accelerator's free memory (``model``: the compiled host model, to size a ticket); 1 on CPU
    and on any backend but JAX, and under mixed precision or data parallelism (packing is for one
    device, float32). Call it inside `lottery.session.session` (it may start JAX)."""
    import keras

    from lottery.data import runtime

    if pack is None and os.environ.get("LOTTERY_PACK"):
        pack = int(os.environ["LOTTERY_PACK"])
    if pack is not None and pack < 1:
        raise ValueError(f"pack must be >= 1, got {pack}")
    reason = None
    if keras.backend.backend() != "jax":
        reason = f"packing needs the JAX backend (this is {keras.backend.backend()})"
    elif cfg.mixed_precision:
        reason = "packing trains in float32 only (the config asks for mixed precision)"
    elif runtime.num_replicas() > 1:
        reason = f"packing runs on one device (this process has {runtime.num_replicas()} replicas)"
    if reason:
        if pack and pack > 1:
            log.info("retrain: %s: the tickets train one after another", reason)
        return 1
    if pack is None:
        pack = _auto_pack(cfg, model) if model is not None else 1
    return max(1, min(tickets, pack))


def _auto_pack(cfg, model) -> int:
    """Free accelerator memory / one ticket's estimated bytes (1 on CPU, where packing gains little)."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return 1
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    per_ticket = estimate_ticket_bytes(cfg, model)
    pack = max(1, min(MAX_AUTO_PACK, int(MEMORY_SHARE * free // per_ticket)))
    log.info("retrain: pack size %d from %.1f GiB free on %s at about %.1f MiB per ticket", pack, free / 2**30,
             device.device_kind, per_ticket / 2**20)
    return pack


def estimate_ticket_bytes(cfg, model) -> int:
    """One packed ticket's device bytes: float32 parameters x (weights, gradients, mask, optimizer
    slots), plus the activations of a training step at the config's batch size (forward and
    backward, with a factor 3 for XLA's temporaries)."""
    params = sum(math.prod(v.shape) for v in model.weights)
    slots = 2 if cfg.optimizer == "adam" else 1
    activations = sum(math.prod(layer.output.shape[1:]) for layer in model.layers if layer.output is not None)
    return 4 * params * (3 + slots) + 4 * 3 * cfg.batch_size * activations


def is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def train_packed(tickets: list[Ticket], model, data: tuple, *, size: int) -> None:
    """The packed strategy: ``tickets`` (of one rewind point and control kind) in packs of ``size``
    with the compiled host ``model`` and ``data`` = (train, val, steps per epoch): the same
    artifacts and results as `lottery.late_reset.train_in_turn` gives them one by one. A pack that
    fails leaves an error.json in each of its unfinished tickets and raises."""
    train, val, spe = data
    steps = PackedSteps(model)
    queue = [chunk[i:i + size] for chunk in _by_start_step(tickets, spe) for i in range(0, len(chunk), size)]
    while queue:
        pack = queue.pop(0)
        try:
            Pack(steps, pack, train, val, spe).train()
        except Exception as exc:
            if not is_out_of_memory(exc) or len(pack) == 1:
                for ticket in pack:
                    if ticket.result is None:
                        ticket.record_failure()
                raise
            half = len(pack) // 2
            log.warning("retrain: a pack of %d tickets does not fit (%s): packs of %d and %d instead",
                        len(pack), str(exc).splitlines()[0][:200], half, len(pack) - half)
            queue[:0] = [pack[:half], pack[half:]]


def _by_start_step(tickets: list[Ticket], spe: int) -> list[list[Ticket]]:
    """The tickets grouped by the step they start from: the rewind step, or the step of their own
    checkpoint (a killed pack's tickets resume together; one killed while writing may be an epoch behind)."""
    from lottery.config import Step
    from lottery.training import read_resume_checkpoint

    groups: dict[int, list[Ticket]] = {}
    for ticket in tickets:  # a damaged checkpoint is named, deleted, and its ticket starts from its rewind point
        found = read_resume_checkpoint(ticket.paths.checkpoint, f"retrain {ticket.name}")
        start = found[1]["step"] if found else Step.parse(ticket.rewind).iterations(spe)
        groups.setdefault(start, []).append(ticket)
    return [groups[start] for start in sorted(groups)]


class PackedSteps:
    """The compiled, vectorised train and evaluation steps of one host model (traced once per pack
    size: the masks and every other variable are inputs, never constants)."""

    def __init__(self, model):
        import jax
        import jax.numpy as jnp
        import keras

        self.model = model
        optimizer, loss_fn = model.optimizer, model.loss

        def loss_and_updates(tv, ntv, x, y):
            y_pred, ntv = model.stateless_call(tv, ntv, x, training=True)
            return loss_fn(y, y_pred), (y_pred, ntv)

        def train_one(tv, ntv, ov, x, y):
            (loss, (y_pred, ntv)), grads = jax.value_and_grad(loss_and_updates, has_aux=True)(tv, ntv, x, y)
            tv, ov = optimizer.stateless_apply(ov, grads, tv)
            return tv, ntv, ov, loss, jnp.sum(jnp.argmax(y_pred, axis=-1) == y)

        def evaluate_one(tv, ntv, x, y):
            y_pred, _ = model.stateless_call(tv, ntv, x, training=False)
            losses = keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
            return jnp.sum(losses), jnp.sum(jnp.argmax(y_pred, axis=-1) == y)

        self.train = jax.jit(jax.vmap(train_one, in_axes=(0, 0, 0, None, None)), donate_argnums=(0, 1, 2))
        self.evaluate = jax.jit(jax.vmap(evaluate_one, in_axes=(0, 0, None, None)))

    def variables(self) -> tuple[list, list, list]:
        model = self.model
        return model.trainable_variables, model.non_trainable_variables, model.optimizer.variables

    def snapshot(self) -> tuple[list, list, list]:
        """The host model's current state (one ticket's), as numpy arrays."""
        return tuple([np.asarray(v.value) for v in group] for group in self.variables())

    def restore(self, state, index: int) -> None:
        """Ticket ``index``'s slice of the stacked ``state`` into the host model."""
        for group, values in zip(self.variables(), state):
            for variable, value in zip(group, values):
                variable.assign(np.asarray(value[index]))


class Pack:
    """Tickets of one start step training side by side; writes each one's artifacts."""

    def __init__(self, steps: PackedSteps, tickets: list[Ticket], train, val, spe: int):
        self.steps, self.tickets, self.cfg = steps, tickets, tickets[0].cfg
        self.train_data, self.val_data, self.spe = train, val, spe
        self.total = self.cfg.total_iterations(spe)
        self.unit = tickets[0].label  # the pack's shared phases are charged to its first ticket

    def train(self) -> None:
        """Bring each ticket to its start point, stack, train to the end, finish every ticket."""
        step, state, starts = self._start()
        log.info("retrain: a pack of %d tickets from step %d: %s", len(self.tickets), step,
                 ", ".join(t.name for t in self.tickets))
        while step < self.total:
            step, state = self._epoch(step, state, starts)
        for i, ticket in enumerate(self.tickets):
            self.steps.restore(state, i)
            ticket.finish(self.steps.model, starts[i], starts[i].history, self.spe, pack=len(self.tickets))

    def _start(self) -> tuple[int, tuple, list[Start]]:
        """Each ticket's start (rewind or its checkpoint, mask applied) from the host model, its
        state stacked on a leading ticket axis. Resumed tickets must share one start step."""
        import jax.numpy as jnp

        states, starts = [], []
        for ticket in self.tickets:
            starts.append(ticket.start(self.steps.model, self.train_data, self.spe))
            states.append(self.steps.snapshot())
        if len({s.step for s in starts}) != 1:
            raise ValueError(f"a pack needs one start step; these tickets start at {sorted({s.step for s in starts})}")
        stacked = tuple([jnp.stack([s[g][k] for s in states]) for k in range(len(states[0][g]))] for g in range(3))
        return starts[0].step, stacked, starts

    def _epoch(self, step: int, state, starts: list[Start]):
        """Train to the end of the epoch (from ``step``), evaluate, and end the epoch of every ticket."""
        import jax.numpy as jnp

        epoch, position = divmod(step, self.spe)
        end = min((epoch + 1) * self.spe, self.total)
        wall_start = time.perf_counter()
        tv, ntv, ov = state
        losses, correct = [], []
        stream = self.train_data.batches(self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,
                                         augmentation=self.cfg.augmentation, skip_batches=position).take(end - step)
        with phase("epochs", self.unit):
            for x, y in stream:
                tv, ntv, ov, loss, hits = self.steps.train(tv, ntv, ov, jnp.asarray(x), jnp.asarray(y))
                losses.append(loss)
                correct.append(hits)
            loss_sum, hits_sum = (np.asarray(jnp.stack(a)).astype(np.float64).sum(axis=0) for a in (losses, correct))
        train_s = time.perf_counter() - wall_start
        with phase("eval", self.unit):
            val = self._evaluate(tv, ntv)
        state, n = (tv, ntv, ov), end - step
        for i, ticket in enumerate(self.tickets):
            train_metrics = (loss_sum[i] / n, hits_sum[i] / (n * self.cfg.batch_size), n * self.cfg.batch_size / train_s)
            self._end_epoch(i, ticket, state, end, train_metrics, val[i], starts[i].history, wall_start)
        return end, state

    def _evaluate(self, tv, ntv) -> list[tuple[float, float]]:
        """(val loss, val accuracy) per ticket over the whole validation split."""
        import jax.numpy as jnp

        from lottery.training import eval_batch_size

        loss, hits, seen = 0.0, 0, 0
        for x, y in self.val_data.eval_batches(eval_batch_size(self.cfg.batch_size, self.val_data.image_shape)):
            batch_loss, batch_hits = self.steps.evaluate(tv, ntv, jnp.asarray(x), jnp.asarray(y))
            loss, hits, seen = loss + np.asarray(batch_loss, np.float64), hits + np.asarray(batch_hits), seen + len(y)
        return [(float(loss[i] / seen), float(hits[i] / seen)) for i in range(len(self.tickets))]

    def _end_epoch(self, i: int, ticket: Ticket, state, step: int, train_metrics, val, history: list, wall_start: float) -> None:
        """Ticket ``i``'s epoch row, its log line, and its metrics.csv and checkpoint (via the host model)."""
        from lottery.training import end_of_epoch, epoch_saver

        model = self.steps.model
        self.steps.restore(state, i)
        end_of_epoch(history, step, self.spe, self.total, model.optimizer, train_metrics, val, wall_start, ticket.label)
        with phase("write", ticket.label):
            epoch_saver(model, ticket.paths.checkpoint, ticket.paths.metrics, self.spe)(step, history)
