"""AutoAttack through `pyautoattack` (the authors' code), resumable batch by batch.

The attacks themselves (APGD-CE, APGD-T, FAB-T, Square, configured by pyautoattack's
`standard` version) are pyautoattack's objects; this module only drives them over the data,
the way `AutoAttack.run_standard_evaluation` does: every attack runs on the samples that are
still robust, in batches, each call seeded with the evaluation seed.

Why bench drives the loop instead of calling `run_standard_evaluation(state_path=...)`:
pyautoattack 0.2.0 cannot resume from its own state file. (1) `EvaluationState.to_disk` writes
the set of attacks with `default=str`, so the file holds the string "{'apgd-ce', ...}" and a
resumed run always fails the "different set of attacks" check; (2) a resumed run never defines
`y_adv` and would stop with UnboundLocalError at its first batch; (3) finishing an attack is
saved at most once a minute, so the attack just finished may run again. Driving the loop here
also gives what the sanity checks need: the robust count after every attack (did Square break
samples the gradient attacks missed?) and every adversarial batch (inside eps and [0,1]?).

The state file (`aa_state.json` in an evaluate job's folder) is rewritten atomically after
every batch: the attacks done, the robust flags, the largest perturbation seen (and whether
any left [0,1]), pyautoattack's warnings so far, and for the attack under way the samples it
started with and how many of its batches are done. A resumed run skips what is decided and
gives exactly the flags an uninterrupted run gives (each batch's result depends only on the
batch and the seed).

Signals. Everything pyautoattack warns about reaches `AAResult.messages` (and so the record's
sanity flags): its checks (randomized defence, probabilities instead of logits, target classes,
dynamic defence), and the warnings its attacks emit while running, above all APGD's "points
with zero gradient" (gradient masking), which pyautoattack sends only to its Python logger
`auto-attack`; both that logger's records and its `warnings.warn` calls are captured. The
checks run as in `run_standard_evaluation`: the randomness check is skipped for
`version="rand"` (that version is for randomized defences), and `check_dynamic` traces one
forward for calls of autograd functions (a defence that differentiates inside its forward).
An attack that had no sample left to attack (every sample broken before it) is listed in
`not_run`, not in `attacks`, as pyautoattack stops there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench.attacks.pgd import check_norm, frozen_parameters, perturbation_size
from bench.errors import BenchError
from bench.registry import ATTACKS
from bench.tf32 import strict_fp32

log = logging.getLogger(__name__)

STATE_FORMAT = "bench-autoattack-state/1"
VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
GRADIENT_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")


def pyautoattack_version() -> str:
    try:
        import pyautoattack

        return str(getattr(pyautoattack, "__version__", "unknown"))
    except ImportError:
        return "missing"


@dataclass
class AAResult:
    """Outcome of one AutoAttack run on n samples."""

    robust: torch.Tensor                 # bool (n,): survived every attack (and was correct clean)
    clean: torch.Tensor                  # bool (n,): correct before any attack
    attacks: list[str]                   # attacks run (on at least one sample), in order
    robust_after: dict[str, int]         # robust count after "clean" and after each attack
    n_target_classes: int
    version: str                         # pyautoattack version
    aa_version: str                      # "standard", "plus" or "rand"
    settings: dict[str, Any] = field(default_factory=dict)  # iterations, restarts, queries of the attacks
    max_perturbation: float = 0.0        # max |x_adv - x| over every batch attacked, before a resume too
    out_of_range: bool = False           # some x_adv left [0,1] (before a resume too)
    resumed: bool = False
    messages: list[str] = field(default_factory=list)  # pyautoattack's warnings, and state notes
    not_run: list[str] = field(default_factory=list)   # planned attacks left with no sample to attack

    @property
    def correct(self) -> int:
        return int(self.robust.sum())

    @property
    def n(self) -> int:
        return int(self.robust.numel())

    def to_dict(self) -> dict[str, Any]:
        """JSON-native form (flags as "0"/"1" strings), for the evaluate job's saved stages."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(robust=to_bits(self.robust), clean=to_bits(self.clean))
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AAResult":
        return cls(**{**data, "robust": from_bits(data["robust"]), "clean": from_bits(data["clean"])})


AA_LOGGER = "auto-attack"  # pyautoattack's logger (AutoAttack.logger, passed on to APGD)


class _Capture(logging.Handler):
    """Keeps every warning pyautoattack emits: its logger's records at WARNING and above, and the
    `warnings.warn` calls made from its code (collected by `capture_pyautoattack`)."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.add(record.getMessage())

    def add(self, message: str) -> None:
        if message not in self.messages:  # APGD repeats its warning per batch and restart
            self.messages.append(message)


def _from_pyautoattack(filename: str) -> bool:
    import pyautoattack

    return filename.startswith(str(Path(pyautoattack.__file__).parent))


@contextlib.contextmanager
def capture_pyautoattack(messages: list[str]):
    """Collect pyautoattack's warnings into `messages` for the duration (see the module doc).

    Python warnings issued from pyautoattack's own files are kept (and logged); any other warning
    raised meanwhile is re-issued afterwards, untouched.
    """
    logger = logging.getLogger(AA_LOGGER)
    handler = _Capture(messages)
    saved_level = logger.level
    if not logger.isEnabledFor(logging.WARNING):
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
    for w in caught:
        if _from_pyautoattack(w.filename):
            handler.add(str(w.message))
            log.warning("pyautoattack: %s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def check_dynamic(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, logger: Any) -> None:
    """pyautoattack's dynamic-defence check, made repeatable: its call counters are module globals
    that it never resets (one flagged model would flag every later one) and it clears any trace
    function (a debugger's, coverage's); both are restored here."""
    from pyautoattack import checks

    saved_counts = dict(checks.funcs)
    saved_trace = sys.gettrace()
    checks.funcs.update({k: 0 for k in checks.funcs})
    try:
        checks.check_dynamic(model, x, False, logger=logger)
    finally:
        sys.settrace(saved_trace)
        checks.funcs.update(saved_counts)


def target_classes(num_classes: int) -> int:
    """Target classes of APGD-T and FAB-T: the version default 9, or every other class if fewer."""
    return max(1, min(9, num_classes - 1))


def attack_list(version: str, num_classes: int) -> list[str]:
    if version not in VERSIONS:
        raise BenchError(f"unknown AutoAttack version {version!r}; one of {', '.join(VERSIONS)}")
    attacks = list(VERSIONS[version])
    if num_classes < 4:  # the targeted DLR loss needs the 4 largest logits
        attacks = [a for a in attacks if a != "apgd-t"]
    if num_classes < 3:  # the DLR loss needs 3
        attacks = [a for a in attacks if a != "apgd-dlr"]
    return attacks


def build_autoattack(model: nn.Module, *, eps: float, num_classes: int, seed: int,
                     version: str = "standard", device: torch.device | str = "cpu", budget: float = 1.0,
                     norm: str = "Linf"):
    """pyautoattack's AutoAttack for `version` and `norm` ("Linf" or "L2"), with the real number of
    classes (min(9, C-1) targets).

    budget < 1 scales every attack's iterations and Square's queries down (at least 1 each): a
    cheap AutoAttack for smoke runs, recorded in the protocol and flagged as not the standard one.
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BenchError("AutoAttack needs the pyautoattack package (pip install pyautoattack)") from exc
    aa = AutoAttack(model, device=device, eps=eps, norm=check_norm(norm), seed=seed, version=version)
    aa.verbose = False
    n_target = target_classes(num_classes)
    aa.apgd_targeted.n_target_classes = n_target
    aa.fab.n_target_classes = n_target
    if budget < 1:
        for attack in (aa.apgd, aa.apgd_targeted, aa.fab):
            attack.n_iter = max(1, math.ceil(attack.n_iter * budget))
        aa.square.n_queries = max(1, math.ceil(aa.square.n_queries * budget))
    return aa, attack_list(version, num_classes), n_target


def _run_one(aa: Any, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One attack on one batch, configured exactly as run_standard_evaluation configures it."""
    seed = aa.get_seed()
    if attack in ("apgd-ce", "apgd-dlr"):
        aa.apgd.loss = "ce" if attack == "apgd-ce" else "dlr"
        aa.apgd.seed = seed
        return aa.apgd.perturb(x, y)
    if attack == "apgd-t":
        aa.apgd_targeted.seed = seed
        return aa.apgd_targeted.perturb(x, y)
    if attack in ("fab", "fab-t"):
        aa.fab.targeted = attack == "fab-t"
        if attack == "fab-t":
            aa.fab.n_restarts = 1
        aa.fab.seed = seed
        return aa.fab.perturb(x, y)
    if attack == "square":
        aa.square.seed = seed
        return aa.square.perturb(x, y)
    raise BenchError(f"unknown AutoAttack attack {attack!r}")


def to_bits(flags: torch.Tensor) -> str:
    """Bool flags as a "0"/"1" string (compact, exact JSON)."""
    return "".join("1" if f else "0" for f in flags.tolist())


def from_bits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def model_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **settings: Any) -> dict[str, Any]:
    """What a state file must match to be resumed: the model, the data and the attack settings."""
    digest = hashlib.sha256()
    digest.update(x.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(y.detach().cpu().numpy().astype("int64").tobytes())
    return {"n": int(len(y)), "data_sha256": digest.hexdigest()[:16], "model_sha256": model_digest(model),
            **settings}


class _State:
    """The resumable state: read, updated, and written atomically after every batch."""

    def __init__(self, path: Path | None, fp: dict[str, Any], attacks: list[str]):
        self.path = Path(path) if path is not None else None
        self.fp = fp
        self.attacks = attacks
        self.done: list[str] = []
        self.clean: torch.Tensor | None = None
        self.robust: torch.Tensor | None = None
        self.robust_after: dict[str, int] = {}
        self.current: dict[str, Any] | None = None
        self.max_perturbation = 0.0  # kept so a resumed run still reports what earlier batches did
        self.out_of_range = False
        self.warnings: list[str] = []  # pyautoattack's warnings of the batches already run
        self.resumed = False

    def load(self, messages: list[str]) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            messages.append(f"ignored an unreadable AutoAttack state {self.path} ({exc}); starting over")
            return
        if data.get("format") != STATE_FORMAT or data.get("fingerprint") != self.fp \
                or data.get("attacks") != self.attacks:
            messages.append(f"ignored the AutoAttack state {self.path}: it was made for another model, other "
                            f"data or other settings; starting over")
            return
        self.done = list(data["done"])
        self.clean = from_bits(data["clean"]) if data.get("clean") is not None else None
        self.robust = from_bits(data["robust"]) if data.get("robust") is not None else None
        self.robust_after = {k: int(v) for k, v in data.get("robust_after", {}).items()}
        self.current = data.get("current")
        self.max_perturbation = float(data.get("max_perturbation", 0.0))
        self.out_of_range = bool(data.get("out_of_range", False))
        self.warnings = list(data.get("warnings", []))
        self.resumed = self.clean is not None

    def save(self) -> None:
        if self.path is None:
            return
        from bench import files

        data = {"format": STATE_FORMAT, "pyautoattack": pyautoattack_version(), "fingerprint": self.fp,
                "attacks": self.attacks, "done": self.done,
                "clean": to_bits(self.clean) if self.clean is not None else None,
                "robust": to_bits(self.robust) if self.robust is not None else None,
                "robust_after": self.robust_after, "current": self.current,
                "max_perturbation": self.max_perturbation, "out_of_range": self.out_of_range,
                "warnings": self.warnings}
        files.write_json(self.path, data)


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, num_classes: int,
                   seed: int, version: str = "standard", batch_size: int = 250, budget: float = 1.0,
                   state_path: Path | str | None = None,
                   on_batch: Callable[[str, int, int], None] | None = None, norm: str = "Linf") -> AAResult:
    """Run AutoAttack on (x, y) and return per-sample robust flags.

    The caller puts the model in eval mode (see `bench.attacks.accuracy`); parameters are frozen while
    it runs (FAB's backward() would otherwise fill their .grad) and TF32 is off (strict fp32).
    `state_path` makes the run resumable: an interrupted run continues with the attacks and
    batches not yet decided. `on_batch(attack, batch_done, batches)` is called after every batch.
    `norm`: the threat model ("Linf" or "L2"); `max_perturbation` is measured in it (per-sample L2
    norm for L2).
    """
    with frozen_parameters(model), strict_fp32():
        return _run_autoattack(model, x, y, eps=eps, num_classes=num_classes, seed=seed, version=version,
                               batch_size=batch_size, budget=budget, state_path=state_path, on_batch=on_batch,
                               norm=norm)


def _run_autoattack(model, x, y, *, eps, num_classes, seed, version, batch_size, budget, state_path,
                    on_batch, norm="Linf") -> AAResult:
    device = x.device
    aa, attacks, n_target = build_autoattack(model, eps=eps, num_classes=num_classes, seed=seed,
                                             version=version, device=device, budget=budget, norm=norm)
    notes: list[str] = []  # about the state file
    # the norm joins the fingerprint only when it is not L-inf, so L-inf states saved before it existed still resume
    fp = fingerprint(model, x, y, eps=round(float(eps), 10), seed=int(seed), version=version,
                     n_target_classes=n_target, batch_size=int(batch_size), budget=float(budget),
                     **({} if norm == "Linf" else {"norm": norm}))
    state = _State(Path(state_path) if state_path is not None else None, fp, attacks)
    state.load(notes)
    with capture_pyautoattack(state.warnings):
        result = _attack_all(aa, attacks, n_target, state, x, y, num_classes=num_classes, version=version,
                             batch_size=batch_size, on_batch=on_batch, norm=norm)
    state.save()  # with the warnings of the last batch
    result.messages = notes + state.warnings
    result.settings["budget"] = budget
    return result


def _attack_all(aa, attacks, n_target, state, x, y, *, num_classes, version, batch_size, on_batch,
                norm="Linf") -> AAResult:
    """The checks, the clean pass and every attack, batch by batch, with `state` saved after each."""
    from pyautoattack import checks

    device = x.device
    logger = logging.getLogger(AA_LOGGER)
    probe_x, probe_y = x[:batch_size], y[:batch_size]
    if version != "rand":  # as run_standard_evaluation: "rand" is the version for randomized defences
        checks.check_randomized(aa.get_logits, probe_x, probe_y, bs=batch_size, logger=logger)
    n_cls = checks.check_range_output(aa.get_logits, probe_x, logger=logger)
    if n_cls != num_classes:
        raise BenchError(f"AutoAttack: the model has {n_cls} outputs but the data has {num_classes} classes")
    check_dynamic(aa.model, probe_x, logger)
    checks.check_n_classes(n_cls, attacks, n_target, n_target, logger=logger)

    if state.clean is None:
        clean = torch.zeros(len(y), dtype=torch.bool)
        with torch.no_grad():
            for start in range(0, len(y), batch_size):
                pred = aa.get_logits(x[start:start + batch_size]).argmax(1)
                clean[start:start + batch_size] = (pred == y[start:start + batch_size]).cpu()
        state.clean, state.robust = clean, clean.clone()
        state.robust_after = {"clean": int(clean.sum())}
        state.save()
    robust = state.robust
    for attack in attacks:
        if attack in state.done:
            continue
        if state.current is None or state.current.get("attack") != attack:
            state.current = {"attack": attack, "todo": robust.nonzero().flatten().tolist(), "batches_done": 0}
            state.save()
        todo = torch.tensor(state.current["todo"], dtype=torch.long)
        if len(todo) == 0:  # nothing left to attack: pyautoattack stops here; the attack did not run
            state.done.append(attack)
            state.current = None
            state.save()
            continue
        batches = math.ceil(len(todo) / batch_size)
        for b in range(int(state.current["batches_done"]), batches):
            idx = todo[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx.to(device)], y[idx.to(device)]
            with torch.no_grad():
                adv = _run_one(aa, attack, xb.clone(), yb.clone())
                pred = aa.get_logits(adv).argmax(1)
            if len(idx):
                state.max_perturbation = max(state.max_perturbation, perturbation_size(adv, xb, norm)
                                             if norm != "Linf" else float((adv - xb).abs().max()))
                state.out_of_range = state.out_of_range or bool(adv.min() < 0) or bool(adv.max() > 1)
            broken = (pred != yb).cpu()
            robust[idx[broken]] = False
            state.current["batches_done"] = b + 1
            state.save()
            if on_batch is not None:
                on_batch(attack, b + 1, batches)
        state.robust_after[attack] = int(robust.sum())
        state.done.append(attack)
        state.current = None
        state.save()
        log.info("robust after %s: %d / %d", attack, state.robust_after[attack], len(y))
    settings = {"apgd_iterations": aa.apgd.n_iter, "apgd_restarts": aa.apgd.n_restarts,
                "apgd_t_restarts": aa.apgd_targeted.n_restarts, "fab_iterations": aa.fab.n_iter,
                "fab_restarts": aa.fab.n_restarts, "square_queries": aa.square.n_queries}
    ran = [a for a in attacks if a in state.robust_after]
    return AAResult(robust=robust.clone(), clean=state.clean.clone(), attacks=ran,
                    robust_after=dict(state.robust_after), n_target_classes=n_target,
                    version=pyautoattack_version(), aa_version=version, settings=settings,
                    max_perturbation=state.max_perturbation, out_of_range=state.out_of_range,
                    resumed=state.resumed, not_run=[a for a in attacks if a not in ran])


def square_gain(robust_after: dict[str, int], attacks: list[str]) -> int:
    """Samples Square broke after every gradient attack before it had failed (0 if Square did not run)."""
    if "square" not in robust_after:
        return 0
    order = ["clean", *attacks]
    before = [robust_after[a] for a in order[:order.index("square")] if a in robust_after]
    return (min(before) - robust_after["square"]) if before else 0


@ATTACKS.register("autoattack")
def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, seed: int = 0,
               num_classes: int | None = None, version: str = "standard", batch_size: int = 250,
               state_path: Path | str | None = None, norm: str = "Linf") -> torch.Tensor:
    """AutoAttack (pyautoattack, L-inf or L2, resumable): per-sample robust flags."""
    from bench.attacks.pgd import eval_guard

    classes = num_classes if num_classes is not None else int(y.max()) + 1
    with eval_guard(model), torch.random.fork_rng(devices=cuda_devices(x)):
        return run_autoattack(model, x, y, eps=eps, num_classes=classes, seed=seed, version=version,
                              batch_size=batch_size, state_path=state_path, norm=norm).robust


def cuda_devices(x: torch.Tensor) -> list[int]:
    """The CUDA device of x, for torch.random.fork_rng (pyautoattack reseeds the global RNGs)."""
    return [x.device.index or 0] if x.device.type == "cuda" else []
