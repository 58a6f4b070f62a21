"""The adapters resident beside one model: names, slots, the memory budget, and the per-pass grouping.

Every resident adapter owns a slot. Each of the model's projections is
swapped (once) for a :class:`~ferrum.adapters.batching.LoraLinear` holding the
factors of every slot stacked and zero-padded to the largest rank; the base
weight is never merged, copied or touched. Loading or unloading an adapter
re-stacks only the (small) factors.

A projection the model fused at load (q/k/v or gate/up as one matrix) stays one
low-rank product: per slot, the A factors of the members an adapter targets are
stacked (``[r_q + r_k + r_v, in]``) and their B factors placed block-diagonally
over the members' output columns, zeros where a member is not adapted. The same
rule places a fused target (Phi-3's ``qkv_proj``) over unfused projections: each
takes its own columns of B. So any mix of fused and separate, on either side, is
one ``lora_apply`` per matrix the model runs.

Memory budget policy: the slot stacks of resident adapters may take up to
``budget_bytes`` in the compute dtype, counted as they are built: every slot of a
matrix padded to the largest rank any adapter gives it (one rank-64 adapter
among rank-8 ones makes each of their slots rank 64 on that matrix).
Adapters loaded by name (:meth:`AdapterRegistry.load`) stay until unloaded;
adapters loaded on first use from a path (a request's ``ferrum_lora_path``)
are a cache: when a new adapter does not fit, the least recently used of
those that no unfinished request holds are evicted (a later request naming
the path loads it again). If it still does not fit, loading is refused with
an :class:`~ferrum.errors.AdapterError` that says what is resident.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Hashable, Iterator, Mapping, Sequence

import numpy as np

from ferrum.adapters.batching import LoraBatch, LoraLinear
from ferrum.adapters.files import LoraAdapter, LoraWeights, check_range, projection_span, read_adapter
from ferrum.errors import AdapterError, InvalidRequestError
from ferrum.metadata import EMPTY, LORA_ADAPTER, LORA_PATH
from ferrum.arch.mlp import MLP_KINDS
from ferrum.mixers import MIXER_KINDS
from ferrum.recurrent import MIXERS, mixer_spec
from ferrum.hookspec import DTYPE_BYTES

#: Default bytes the slot stacks of resident adapters may take.
DEFAULT_BUDGET_BYTES = 2 << 30

_Part = tuple[int, int, LoraWeights]  # one projection's factors on a matrix: (start, stop) columns of its group



class _Target:
    """One matrix the model runs, wrapped: its stored layer (an adapter's, which every pass of a looped model runs),
    its group of projections (see ``projection_span``) and the output columns of that group it produces."""

    __slots__ = ("layer", "group", "start", "stop", "linear")

    def __init__(self, layer: int, group: str, start: int, stop: int, linear: LoraLinear):
        self.layer, self.group, self.start, self.stop, self.linear = layer, group, start, stop, linear


@dataclass(frozen=True)
class AdapterInfo:
    """What ``llm.adapters`` lists for one resident adapter."""

    name: str
    path: Path
    format: str  # "peft" | "mlx-lm"
    max_rank: int
    projections: int  # how many projections it adapts
    nbytes: int
    pinned: bool  # loaded by name (kept until unloaded) rather than on first use from a path
    in_use: int  # unfinished requests holding it


class _Resident:
    __slots__ = ("adapter", "slot", "pinned", "users", "nbytes")

    def __init__(self, adapter: LoraAdapter, slot: int, pinned: bool, nbytes: int):
        self.adapter, self.slot, self.pinned, self.users, self.nbytes = adapter, slot, pinned, 0, nbytes


class AdapterRegistry:
    """Resident LoRA adapters of one :class:`~ferrum.model.DecoderOnlyLLM`."""

    def __init__(self, model: Any, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.model = model
        self.budget_bytes = budget_bytes
        #: The current pass's grouping (read by every LoraLinear); None when no token uses an adapter.
        self.batch: LoraBatch | None = None
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._slots: list[str | None] = []
        self._targets: list[_Target] = []
        self._lock = threading.RLock()  # loads and request holds come from the callers' threads

    # ------------------------------------------------------------ queries
    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def list(self) -> list[AdapterInfo]:
        """Resident adapters, in load order of their slots."""
        with self._lock:  # as another thread unloads one
            return [self.info(name) for name in self._slots if name is not None]

    def info(self, name: str) -> AdapterInfo:
        r = self._get(name)
        a = r.adapter
        return AdapterInfo(name, a.path, a.format, a.max_rank, len(a.weights), r.nbytes, r.pinned, r.users)

    @property
    def used_bytes(self) -> int:
        """Bytes the slot stacks of the resident adapters take."""
        return self._stacked_bytes({r.slot: r.adapter for r in self._resident.values()})

    def salt(self, name: str | None) -> bytes:
        """What keys the KV blocks of a sequence run with adapter ``name`` (its content digest)."""
        return b"" if name is None else self._get(name).adapter.digest

    def name_for_salt(self, salt: bytes) -> str | None:
        """The resident adapter whose blocks are keyed by ``salt`` (None for the base model)."""
        if not salt:
            return None
        for name, r in self._resident.items():
            if r.adapter.digest == salt:
                return name
        raise AdapterError("the adapter this sequence was computed with is no longer loaded; load it again")

    def _get(self, name: str) -> _Resident:
        try:
            return self._resident[name]
        except KeyError:
            loaded = ", ".join(self._resident) or "none"
            raise InvalidRequestError(
                f"no LoRA adapter named {name!r} is loaded (loaded: {loaded}); load it with llm.load_adapter"
            ) from None

    # ---------------------------------------------------------- lifetime
    def load(self, name: str, path: str | Path, pinned: bool = True) -> AdapterInfo:
        """Read the adapter at ``path`` and make it resident as ``name``."""
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("an adapter name must be a non-empty string")
        arch = self.model.config.arch
        if arch.sublayers is not None:
            raise AdapterError(f"{self.model.config.model_type}: LoRA adapters are not supported yet on a model whose "
                               f"checkpoint layers each hold {arch.sublayers.lora_refusal}; run the base model, or "
                               "merge the adapter into its weights with PEFT's merge_and_unload")
        if arch.moa is not None:
            raise AdapterError(f"{self.model.config.model_type}: LoRA adapters on a mixture of attention heads are not "
                               "supported yet (Ferrum does not adapt its attention experts); run the base model, or "
                               "merge the adapter into its weights with PEFT's merge_and_unload")
        if arch.recurrent:
            titles = {mixer_spec(arch, m).title for spec in arch.layers for m in spec.mixers if m in MIXERS}
            unadapted = [f"the {title} layers' projections" for title in sorted(titles)]
            if arch.attn_output_gate:
                unadapted.append("the gated attention's q_proj, whose rows hold each head's query and gate")
            if arch.shared_block is not None:
                unadapted.append("the shared attention blocks' projections and adapters")
            attends = any(MIXER_KINDS[spec.mixer].writes_kv(spec) for spec in arch.layers)
            kind = "hybrid models with recurrent layers" if attends else "recurrent models (no attention layers)"
            raise AdapterError(f"{self.model.config.model_type}: LoRA adapters on {kind} "
                               f"are not supported yet (Ferrum does not adapt {' nor '.join(unadapted)}); run "
                               "the base model, or merge the adapter into its weights with PEFT's merge_and_unload")
        adapter = read_adapter(path, self.model.config)
        check_range(adapter, self.model.dtype)
        nbytes = adapter.nbytes(DTYPE_BYTES.get(self.model.dtype, 4))
        with self._lock:
            return self._add(name, adapter, nbytes, pinned)

    def _add(self, name: str, adapter: LoraAdapter, nbytes: int, pinned: bool) -> AdapterInfo:
        if name in self._resident:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        self._make_room(adapter, name)
        slot = self._free_slot()
        if slot == len(self._slots):
            self._slots.append(None)
        self._slots[slot] = name
        self._resident[name] = _Resident(adapter, slot, pinned, nbytes)
        try:
            self._restack()
        except BaseException:
            del self._resident[name]
            self._slots[slot] = None
            raise
        return self.info(name)

    def load_path(self, path: str | Path, name: str | None = None) -> str:
        """The adapter at ``path``, loaded (evictable) on first use under ``name`` (default: the resolved path)."""
        resolved = Path(path).expanduser().resolve()
        name = name or str(resolved)
        with self._lock:
            r = self._resident.get(name)
            if r is not None:
                if r.adapter.path.resolve() != resolved:
                    raise InvalidRequestError(
                        f"adapter {name!r} is loaded from {r.adapter.path}, not {resolved}; use another name"
                    )
                self._resident.move_to_end(name)
                return name
        try:
            self.load(name, resolved, pinned=False)
        except AdapterError:
            if name not in self._resident:  # another thread loaded it meanwhile
                raise
        return name

    def resolve(self, lora: str | None, metadata: Mapping[str, Any]) -> str | None:
        """The adapter a request runs with: ``lora``, or its metadata's ``ferrum_lora_adapter`` /
        ``ferrum_lora_path`` (loaded on first use); None for the base model."""
        named = metadata.get(LORA_ADAPTER)
        if lora is not None and named is not None and lora != named:
            raise InvalidRequestError(f"lora={lora!r} but metadata {LORA_ADAPTER} is {named!r}; give one adapter")
        name = lora if lora is not None else named
        path = metadata.get(LORA_PATH)
        return name if path is None else self.load_path(path, name)

    def unload(self, name: str) -> None:
        """Drop an adapter no unfinished request uses; its slot is reused by the next load."""
        with self._lock:
            self._remove(name)

    def _remove(self, name: str) -> None:
        r = self._get(name)
        if r.users:
            raise AdapterError(
                f"adapter {name!r} is used by {r.users} unfinished request(s); unload it when they finish"
            )
        del self._resident[name]
        self._slots[r.slot] = None
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        self._restack()

    def acquire(self, name: str) -> bytes:
        """An unfinished request holds ``name`` (it cannot be unloaded or evicted); returns its salt."""
        with self._lock:
            r = self._get(name)
            r.users += 1
            self._resident.move_to_end(name)
            return r.adapter.digest

    def release(self, name: str) -> None:
        with self._lock:
            r = self._resident.get(name)
            if r is not None and r.users:
                r.users -= 1

    def _free_slot(self) -> int:
        return self._slots.index(None) if None in self._slots else len(self._slots)

    def _make_room(self, adapter: LoraAdapter, name: str) -> None:
        """Evict unpinned, unused adapters (least recently used first) until ``adapter`` fits the budget."""
        def with_it() -> int:
            return self._stacked_bytes({**{r.slot: r.adapter for r in self._resident.values()},
                                        self._free_slot(): adapter})

        alone = self._stacked_bytes({0: adapter})
        if alone > self.budget_bytes:
            raise AdapterError(
                f"adapter {name!r} needs {alone / 2**20:.1f} MiB, more than the whole adapter budget of "
                f"{self.budget_bytes / 2**20:.1f} MiB; raise the budget (llm.model.adapters.budget_bytes)"
            )
        for victim in [n for n, r in self._resident.items() if not r.pinned and not r.users]:
            if with_it() <= self.budget_bytes:
                return
            self._remove(victim)
        if with_it() > self.budget_bytes:
            held = ", ".join(f"{n} (rank {r.adapter.max_rank})" for n, r in self._resident.items())
            raise AdapterError(
                f"adapter {name!r} would make the adapter stacks {with_it() / 2**20:.1f} MiB (each slot padded to "
                f"the largest rank of each matrix), over the {self.budget_bytes / 2**20:.1f} MiB adapter budget; "
                f"resident: {held}; unload one or raise the budget (llm.model.adapters.budget_bytes)"
            )

    # ------------------------------------------------------------ stacks
    def _stacking(self, adapters: Mapping[int, LoraAdapter]) -> Iterator[tuple[_Target, dict[int, list[_Part]]]]:
        """Each wrapped matrix with the factors each slot puts on it: ``(start, stop, weights)`` of the
        projections, among the columns of the matrix's group, that overlap the matrix's own columns."""
        self._install()
        config = self.model.config
        placed: dict[tuple[int, str], list[tuple[int, int, int, LoraWeights]]] = {}  # (layer, group) -> factors
        for slot, adapter in adapters.items():
            for (layer, proj), w in adapter.weights.items():
                group, start, stop = projection_span(config, layer, proj)
                placed.setdefault((layer, group), []).append((slot, start, stop, w))
        for t in self._targets:
            by_slot: dict[int, list[_Part]] = {}
            for slot, start, stop, w in placed.get((t.layer, t.group), ()):
                if max(start, t.start) < min(stop, t.stop):
                    by_slot.setdefault(slot, []).append((start, stop, w))
            yield t, by_slot

    def _stacked_bytes(self, adapters: Mapping[int, LoraAdapter]) -> int:
        """Bytes the slot stacks of ``adapters`` (by slot) take in the compute dtype."""
        slots, total = max(adapters, default=-1) + 1, 0
        for t, by_slot in self._stacking(adapters):
            if by_slot:
                rank = max(sum(w.rank for _, _, w in parts) for parts in by_slot.values())
                n_in = next(iter(by_slot.values()))[0][2].a.shape[0]
                total += slots * rank * (n_in + t.stop - t.start)
        return total * DTYPE_BYTES.get(self.model.dtype, 4)

    def _restack(self) -> None:
        """Rebuild each wrapped matrix's slot stacks from the resident adapters' factors."""
        ops, dtype = self.model.ops, self.model.dtype
        for t, by_slot in self._stacking({r.slot: r.adapter for r in self._resident.values()}):
            if not by_slot:
                t.linear.factors = None
                continue
            rank = max(sum(w.rank for _, _, w in parts) for parts in by_slot.values())
            n_in = next(iter(by_slot.values()))[0][2].a.shape[0]
            a = np.zeros((len(self._slots), rank, n_in), dtype=np.float32)
            b = np.zeros((len(self._slots), rank, t.stop - t.start), dtype=np.float32)
            for slot, parts in by_slot.items():
                row = 0
                for start, stop, w in parts:
                    lo, hi = max(start, t.start), min(stop, t.stop)
                    rows = slice(row, row + w.rank)
                    a[slot, rows] = w.a.T
                    b[slot, rows, lo - t.start : hi - t.start] = w.b[:, lo - start : hi - start] * np.float32(w.scale)
                    row += w.rank
            t.linear.factors = ops.from_numpy(a, dtype), ops.from_numpy(b, dtype)

    def _install(self) -> None:
        """Swap every adaptable matrix for a LoraLinear, once. The targets are kept only once every layer's are made:
        an install that fails midway keeps none, so the next one swaps every matrix again (a LoraLinear copies its
        base's op, so one swapped before computes the base model's still and is swapped like the others)."""
        if self._targets:
            return
        config, lora_apply = self.model.config, self.model.ops.lora_apply
        targets: list[_Target] = []

        def wrap(index: int, group: str, start: int, stop: int, linear: Any) -> LoraLinear:
            wrapped = LoraLinear(linear, self, lora_apply)  # a looped model's later passes: their stored layer's
            targets.append(_Target(config.arch.first_pass(index), group, start, stop, wrapped))
            return wrapped

        for index, layer in enumerate(self.model.layers):
            at = partial(wrap, index)
            if layer.qkv is not None:  # a layer without attention (Nemotron NAS's skipped or linear) has none to adapt
                layer.o = config.arch.attention.adapt(layer.qkv, layer.o, at, config.hidden_size)
            MLP_KINDS[config.arch.layers[index].mlp].adapt(layer.mlp, at, config, index)
        self._targets = targets

    # ------------------------------------------------------- forward pass
    def _names(self, items: Sequence[Any]) -> list[str | None]:
        return [self.resolve(getattr(item, "adapter", None), getattr(item, "metadata", EMPTY)) for item in items]

    def salts(self, items: Sequence[Any]) -> dict[Hashable, bytes]:
        """Each adapted item's salt; refuses unknown names and a sequence switching adapters mid-way.

        An item names its adapter in ``adapter`` or in its metadata (executor callers), see :meth:`resolve`.
        """
        salts = {}
        kv = self.model.kv
        for item, name in zip(items, self._names(items)):
            salt = self.salt(name)
            if item.seq_id in kv and kv.salt(item.seq_id) != salt:
                raise InvalidRequestError(
                    f"sequence {item.seq_id!r} was computed with another adapter than {name!r}; "
                    "a sequence keeps its adapter (release it and start again)"
                )
            if salt:
                salts[item.seq_id] = salt
        return salts

    def keep_rows(self, rows: np.ndarray) -> None:
        """The rest of the pass computes only these token rows (the last layer's narrowed batch)."""
        if self.batch is not None:
            self.batch = LoraBatch.from_token_slots(self.batch.token_slots[rows])

    @contextmanager
    def active(self, items: Sequence[Any]) -> Iterator[None]:
        """Group the pass's tokens by adapter for every LoraLinear while the pass runs."""
        names = self._names(items)
        if not any(names):
            yield
            return
        slots = []
        for name in names:
            slots.append(-1 if name is None else self._get(name).slot)
            if name is not None:
                self._resident.move_to_end(name)
        self.batch = LoraBatch.from_items(slots, [len(item.q_tokens) for item in items])
        try:
            yield
        finally:
            self.batch = None
