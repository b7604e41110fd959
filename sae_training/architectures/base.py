"""The interface every trainable SAE architecture implements.

The trainer only ever calls :meth:`TrainableSAE.training_forward`,
:meth:`before_optimizer_step`, :meth:`after_optimizer_step` and
:meth:`to_inference`; everything architecture-specific (activation rule,
sparsity penalty and its schedule, decoder-norm constraint, how the result is
saved) lives in the subclass. Weights use the SAELens orientation:
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from sae_steer_vllm.sae import SAE, Architecture, SAEConfig

DecoderInit = Literal["gaussian", "saelens-heuristic"]
"""How decoder rows start (the encoder always starts as the decoder's transpose):

* ``gaussian``: random directions (normal entries), rows scaled to the initial norm;
* ``saelens-heuristic``: SAELens 5.5's ``decoder_heuristic_init`` (what the paper's release
  used): uniform [0, 1) entries (``torch.rand``, so every row lies in the positive
  orthant), rows scaled to the initial norm (SAELens: 0.1).
"""


def initial_decoder(
    d_sae: int, d_in: int, norm: float, rule: DecoderInit, g: torch.Generator
) -> torch.Tensor:
    """``[d_sae, d_in]`` decoder rows of norm ``norm`` drawn by ``rule`` from ``g``.

    Why both: ``gaussian`` is the heuristic of Anthropic's April 2024 update as usually
    written (random directions); SAELens 5.5 implemented it with ``torch.rand``, and a
    reproduction of an SAE trained with it should start where it started.
    """
    if rule == "gaussian":
        w = torch.randn(d_sae, d_in, generator=g)
    elif rule == "saelens-heuristic":
        w = torch.rand(d_sae, d_in, generator=g)
    else:
        raise ValueError(f"unknown decoder init {rule!r} (gaussian, saelens-heuristic)")
    return w / w.norm(dim=1, keepdim=True) * norm


@dataclass
class ForwardOutput:
    """One training step's result for a batch ``x [B, d_in]``.

    ``loss`` is what is differentiated; ``terms`` are its detached parts for
    logging; ``l0`` is the mean number of active features per token and
    ``fired`` a ``[d_sae]`` bool mask of features active anywhere in the batch.
    """

    recon: torch.Tensor
    loss: torch.Tensor
    l0: torch.Tensor
    fired: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def mse_per_token(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared L2 error summed over d_in, averaged over tokens (SAELens' ``mse_loss``)."""
    return (recon - x).pow(2).sum(-1).mean()


class TrainableSAE(torch.nn.Module):
    """Parameters, init and save logic shared by all architectures."""

    name: ClassVar[str]
    #: architecture name written to cfg.json (sae.py: standard/topk/jumprelu)
    saved_as: ClassVar[Architecture]
    #: True if decoder rows are kept at unit norm (its gradient made orthogonal to them)
    unit_norm_decoder: ClassVar[bool] = False
    #: names of the training-config fields this architecture takes as constructor kwargs
    hparams: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        init_dec_norm: float = 0.1,
        seed: int = 0,
        decoder_init: DecoderInit = "gaussian",
        apply_b_dec_to_input: bool = True,
    ) -> None:
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        #: False: the encoder sees ``x`` itself, not ``x - b_dec`` (saved in cfg.json)
        self.apply_b_dec_to_input = apply_b_dec_to_input
        g = torch.Generator().manual_seed(seed)
        norm = 1.0 if self.unit_norm_decoder else init_dec_norm
        w = initial_decoder(d_sae, d_in, norm, decoder_init, g)
        self.W_dec = torch.nn.Parameter(w.clone())
        # The encoder is stored feature-major (a [d_sae, d_in] buffer seen as [d_in, d_sae]):
        # the sparse kernels compute its gradient feature by feature, which in this layout is
        # the parameter's own, taken without a copy (row-major, every step paid a 19-24 ms
        # transpose of a ~350 ms step at 9,216 x 576). The optimizer updates the buffer as
        # the contiguous [d_sae, d_in] tensor it is (:meth:`optimizer_parameters`).
        self.W_enc = torch.nn.Parameter(w.clone().T)
        self._enc_rows: torch.Tensor | None = None
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    # ---------------------------------------------------------------- hooks
    def encoder_offset(self) -> torch.Tensor:
        """What is subtracted from the input before encoding: ``b_dec``, or zeros when
        ``apply_b_dec_to_input`` is false (then ``b_dec`` gets gradient only from the
        reconstruction, as in SAELens)."""
        return self.b_dec if self.apply_b_dec_to_input else torch.zeros_like(self.b_dec)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def training_forward(self, x: torch.Tensor, progress: float) -> ForwardOutput:
        """Loss and diagnostics; ``progress`` in [0, 1] drives penalty schedules."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter training state to checkpoint (e.g. a running threshold)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    @torch.no_grad()
    def finalize(self, sample: torch.Tensor) -> dict[str, float]:
        """Once training ends: fit inference-only state on ``sample`` (training-space
        activations). Returns numbers worth recording in the metrics."""
        return {}

    def optimizer_parameters(self) -> list[torch.Tensor]:
        """What the optimizer updates: the parameters, with ``W_enc`` as the contiguous
        ``[d_sae, d_in]`` tensor its storage is (fused Adam copies a transposed tensor in
        and out every step). Call after the module is on its device; the gradient is
        handed over in :meth:`before_optimizer_step`."""
        self._enc_rows = self.W_enc.detach().T
        assert self._enc_rows.is_contiguous(), "W_enc must keep its feature-major layout"
        return [self._enc_rows if p is self.W_enc else p for p in self.parameters()]

    def before_optimizer_step(self) -> None:
        """Hand the encoder's gradient to the optimizer's view of it; drop the
        decoder-gradient component that would change row norms."""
        if self._enc_rows is not None:
            g = self.W_enc.grad
            self._enc_rows.grad = None if g is None else g.T.contiguous()
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            w = self.W_dec.data
            g = self.W_dec.grad
            g -= (g * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    #: start b_dec at the data mean ("mean") or at zero ("zero", as SAELens does)
    b_dec_init: ClassVar[str] = "mean"

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """Start the decoder bias at the data mean (TopK) or zero (standard).

        With a mean-centred input every random encoder direction is active on
        about half the tokens, which TopK does not mind but which gives a dense
        L1 SAE a long, lossy start. On layer 18 after 65k tokens: eval EV -4.75
        (mean) vs 0.32 (zero).
        """
        if self.b_dec_init == "mean":
            self.b_dec.data.copy_(sample.mean(0))
        else:
            self.b_dec.data.zero_()

    # ---------------------------------------------------------------- export
    def inference_kwargs(self) -> dict[str, Any]:
        """Extra SAEConfig fields (k) and the threshold tensor, per architecture."""
        return {}

    @torch.no_grad()
    def to_inference(self, scale: float, **cfg_fields: Any) -> SAE:
        """An :class:`SAE` on raw activations, with the input scaling folded in.

        Training saw ``x * scale``. With ``W_enc' = W_enc * scale`` and
        ``W_dec' = W_dec / scale``, ``b_dec' = b_dec / scale`` the raw-space SAE
        has identical feature activations and returns ``recon / scale``.
        """
        extra = self.inference_kwargs()
        threshold = extra.pop("threshold", None)
        cfg = SAEConfig(
            d_in=self.d_in,
            d_sae=self.d_sae,
            architecture=self.saved_as,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            **extra,
            **cfg_fields,
        )
        return SAE(
            cfg,
            (self.W_enc * scale).detach().contiguous(),
            self.b_enc.detach().clone(),
            (self.W_dec / scale).detach().clone(),
            (self.b_dec / scale).detach().clone(),
            threshold,
        )
