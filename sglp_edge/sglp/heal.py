"""Training-free healing of removed layer runs (``--heal linear``), in the spirit of ReplaceMe
(Shopkhoev et al. 2025) and LinearPatch: each contiguous run of removed units is replaced by a
linear map fitted on calibration activations and folded into the weights that remain, so the
healed network keeps its standard architecture (a Hugging Face LM still reloads with
``from_pretrained``; a CIFAR ResNet still rebuilds from its spec).

For a run of removed units ``a..b`` with the kept unit ``p`` just before it, the kept unit's output
is ``Y + M``: ``M`` its residual branch (the MLP output of a decoder layer; ``bn2`` of a ResNet
basic block) and ``Y`` what the branch is added to. The run's output in the ORIGINAL network is
``L_b``. We fit ``T`` (features x features) so that ``M T + Y ~ L_b``, per token (LMs) or per
pixel (CNNs, a 1x1 channel map), by ridge least squares in float64 pulled towards the identity
(``T = I`` is the un-healed pruned network):

    T = (M'M + lam s I)^-1 (M'(L_b - Y) + lam s I),   s = trace(M'M) / features

``T`` folds into the branch's last linear map: ``down_proj`` (``W <- T' W``, ``b <- b T``) or
``conv2`` + ``bn2`` (BN folded into the conv, then ``T`` applied; ``bn2`` left as the identity
affine map with the folded bias), or an inverted-residual block's projection conv + BN the same way. Runs are healed in forward order on the pruned network, so each
fit sees what earlier removals and heals left. A fit is kept only where it helps: when it lowers
the calibration loss of the network (``adapter.loss`` on the calibration batches); otherwise the
run stays un-healed, and the report says so. A run with no foldable kept unit before it (e.g.
removed layers at the very start) is left as it is, also reported.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter, Unit, get_module
from sglp_edge.sglp.baselines import stream_modules_io, calibration_loss

HEALS = ("none", "linear")


@dataclass
class RunHeal:
    before: str | None  # the kept unit the map is folded into
    removed: list[str]
    applied: bool
    reason: str
    loss_before: float | None = None
    loss_after: float | None = None
    fit_rel_error_before: float | None = None  # ||Y + M - L_b|| / ||L_b - Y|| on the calibration tokens
    fit_rel_error_after: float | None = None   # ||Y + M T - L_b|| / ||L_b - Y||


@dataclass
class HealReport:
    method: str
    ridge: float
    runs: list[RunHeal] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def removed_runs(units: Sequence[Unit], removed: Sequence[str]) -> list[tuple[int | None, list[int]]]:
    """Contiguous runs of removed units (indices into ``units``) with the index of the kept unit
    just before each run (``None`` when the run starts the network)."""
    gone = set(removed)
    runs: list[tuple[int | None, list[int]]] = []
    for i, u in enumerate(units):
        if u.name not in gone:
            continue
        if runs and runs[-1][1][-1] == i - 1:
            runs[-1][1].append(i)
        else:
            runs.append((i - 1 if i > 0 else None, [i]))
    return runs


# ---- where a map can be folded ----------------------------------------------------------------

def _conv_bn(unit: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
    """The last conv + BN of a CNN block's branch: ``conv2``/``bn2`` of a ResNet basic block, or
    the 1x1 linear projection + BN ending an inverted-residual block's ``conv`` sequence (MobileNetV2)."""
    conv2, bn2 = getattr(unit, "conv2", None), getattr(unit, "bn2", None)
    if isinstance(conv2, nn.Conv2d) and isinstance(bn2, nn.BatchNorm2d) and conv2.groups == 1:
        return conv2, bn2
    seq = getattr(unit, "conv", None)
    if isinstance(seq, nn.Sequential) and len(seq) >= 2 and isinstance(seq[-2], nn.Conv2d) \
            and isinstance(seq[-1], nn.BatchNorm2d) and seq[-2].groups == 1:
        return seq[-2], seq[-1]
    return None


def _branch(unit: nn.Module) -> tuple[nn.Module, str] | None:
    """(module whose output is the residual branch M, fold kind) of a kept unit, or None."""
    mlp = getattr(unit, "mlp", None)
    if isinstance(mlp, nn.Module) and isinstance(getattr(mlp, "down_proj", None), nn.Linear):
        return mlp, "linear"
    cb = _conv_bn(unit)
    return (cb[1], "conv_bn") if cb is not None else None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(examples, features) in float64: tokens for (B, T, H), pixels for (B, C, H, W)."""
    t = t.detach().double()
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def fold(unit: nn.Module, kind: str, T: torch.Tensor, m_mean: torch.Tensor | None = None,
          m_cov: torch.Tensor | None = None) -> None:
    """Fold ``T`` into the unit's branch so that the branch outputs ``M T``. For ``conv_bn``,
    ``m_mean`` / ``m_cov`` (per-channel mean and covariance of the branch output M on the
    calibration data) give ``bn2`` running statistics that match the new conv output, so a
    fine-tune in training mode (batch statistics) starts from the healed function too."""
    if kind == "linear":
        lin: nn.Linear = unit.mlp.down_proj
        Tf = T.to(lin.weight.dtype)
        lin.weight.copy_(Tf.t() @ lin.weight)  # y = x W' -> y T = x (T' W)'
        if lin.bias is not None:
            lin.bias.copy_(lin.bias @ Tf)
        return
    conv, bn = _conv_bn(unit)  # type: ignore[misc]
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
    shift = bn.bias.double() - bn.running_mean.double() * scale
    w = conv.weight.double() * scale[:, None, None, None]  # BN folded into the conv
    w = torch.einsum("oikl,oc->cikl", w, T)  # output channel c = sum_o T[o, c] * channel o
    conv.weight.copy_(w.to(conv.weight.dtype))
    bias = shift @ T
    if conv.bias is not None:
        bias = bias + conv.bias.double() @ T
        conv.bias.zero_()
    # the new conv output u has mean (m T - bias) and variance diag(T' cov T); bn2 normalises u with
    # those statistics and scales it back: eval mode gives u + bias = M T exactly, and training mode
    # (batch statistics close to these) the same function up to sampling
    if m_mean is not None and m_cov is not None:
        mean_u = m_mean.double() @ T - bias
        var_u = torch.einsum("oc,op,pc->c", T, m_cov.double(), T).clamp_min(1e-12)
    else:  # no statistics: the identity affine map plus the bias (exact in eval mode only)
        mean_u = torch.zeros_like(bias)
        var_u = torch.full_like(bias, 1.0 - bn.eps)
    bn.running_mean.copy_(mean_u.to(bn.running_mean.dtype))
    bn.running_var.copy_(var_u.to(bn.running_var.dtype))
    bn.weight.copy_(torch.sqrt(var_u + bn.eps).to(bn.weight.dtype))
    bn.bias.copy_((mean_u + bias).to(bn.bias.dtype))


# ---- the fit ------------------------------------------------------------------------------------

def _capture(adapter: ModelAdapter, model: nn.Module, mods: dict[str, nn.Module], batch: Any) -> dict[str, torch.Tensor]:
    """The outputs of ``mods`` (name -> module) in one no-grad, eval-mode forward pass."""
    names = list(mods)
    got: dict[str, torch.Tensor] = {}
    stream_modules_io(adapter, model, list(mods.items()), batch, lambda i, _x, y: got.__setitem__(names[i], y))
    return got


def heal_linear(model: nn.Module, adapter: ModelAdapter, removed: Sequence[str], batches: Sequence[Any], *,
                ridge: float = 1e-2, units: Sequence[Unit] | None = None) -> tuple[nn.Module, HealReport]:
    """A copy of the UNPRUNED ``model`` whose kept units carry the fitted maps (see the module
    docstring); remove ``removed`` from it (``adapter.remove``) to get the healed pruned network.
    ``batches``: calibration batches from the training split (the same ones the selection used)."""
    if not batches:
        raise UserError("--heal linear needs calibration batches (--calib-batches >= 1)")
    if ridge <= 0:
        raise UserError(f"the healing ridge must be positive, got {ridge}")
    units = list(units) if units is not None else adapter.units(model)
    batches = adapter.with_targets(model, batches)  # encoders: the unpruned model's embeddings to distil
    work = copy.deepcopy(model)
    orig_mods = {u.name: get_module(model, u.name) for u in units}
    work_mods = {u.name: get_module(work, u.name) for u in units}  # objects survive a temporary removal
    report = HealReport("linear", ridge)
    with adapter.without_units(work, list(removed)):
        for before, run in removed_runs(units, removed):
            names = [units[i].name for i in run]
            if before is None:
                report.runs.append(RunHeal(None, names, False, "no kept unit before the run to fold a map into"))
                continue
            p = units[before].name
            br = _branch(work_mods[p])
            if br is None:
                report.runs.append(RunHeal(p, names, False, f"{p} has no linear residual branch to fold a map into"))
                continue
            branch, kind = br
            feats = None
            MtM = MtR = Msum = None
            n_rows = 0
            err0 = den = 0.0
            for b in batches:
                w = _capture(adapter, work, {"M": branch, "out": work_mods[p]}, b)
                o = _capture(adapter, model, {"L": orig_mods[names[-1]]}, b)
                M, out, L = _rows(w["M"]), _rows(w["out"]), _rows(o["L"])
                if M.shape != out.shape or L.shape != out.shape:
                    raise UserError(f"heal: shapes differ at {p} ({tuple(M.shape)}, {tuple(out.shape)}, {tuple(L.shape)})")
                R = L - (out - M)  # what the branch should produce: L_b - Y
                feats = M.shape[1]
                MtM = M.t() @ M if MtM is None else MtM + M.t() @ M
                MtR = M.t() @ R if MtR is None else MtR + M.t() @ R
                Msum = M.sum(0) if Msum is None else Msum + M.sum(0)
                n_rows += M.shape[0]
                err0 += float((M - R).pow(2).sum())
                den += float(R.pow(2).sum())
            eye = torch.eye(feats, dtype=torch.float64)
            lam = ridge * float(torch.trace(MtM)) / feats
            T = torch.linalg.solve(MtM + lam * eye, MtR + lam * eye)
            # residual of the fit on the same statistics: ||M T - R||^2 = tr(T'M'MT) - 2 tr(T'M'R) + ||R||^2
            err1 = float(torch.trace(T.t() @ MtM @ T) - 2 * torch.trace(T.t() @ MtR)) + den
            loss0 = calibration_loss(adapter, work, batches)
            saved = {k: v.detach().clone() for k, v in work_mods[p].state_dict().items()}
            m_mean = Msum / n_rows
            fold(work_mods[p], kind, T, m_mean, MtM / n_rows - torch.outer(m_mean, m_mean))
            loss1 = calibration_loss(adapter, work, batches)
            helps = loss1 < loss0
            if not helps:
                work_mods[p].load_state_dict(saved)
            report.runs.append(RunHeal(p, names, helps, "lowers the calibration loss" if helps else
                                       "did not lower the calibration loss; left un-healed",
                                       loss0, loss1, (err0 / den) ** 0.5 if den else None,
                                       (max(err1, 0.0) / den) ** 0.5 if den else None))
    return work, report
