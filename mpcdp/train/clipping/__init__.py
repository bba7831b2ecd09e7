"""Per-sample gradient clipping for DP-SGD by book-keeping: one forward, one backward.

DP-SGD (Abadi et al. 2016, "Deep learning with differential privacy", CCS, Algorithm 1) needs
the sum over a batch of per-sample gradients, each clipped to norm at most ``C``. Computing
every per-sample gradient (Opacus) costs memory ``batch x params``; ghost clipping (Li,
Tramer, Liang, Hashimoto 2022, "Large language models can be strong differentially private
learners", ICLR) avoids that but needs a second backward pass. This module implements
book-keeping (BK) of Bu, Wang, Zha, Karypis 2023, "Differentially private optimization on
large model at small cost" (ICML; the fastDP library), which needs neither:

1. A forward pass with hooks on every trainable layer (a module that directly owns
   parameters with ``requires_grad=True``) records the layer input ``A`` (detached) and the
   autograd edge of its output ``Z``. A layer called several times in one forward (weight
   sharing) keeps every call; for Linear, Conv2d and Embedding the calls are concatenated
   along the "time" axis, since a per-sample gradient is the sum over calls.
2. One call ``torch.autograd.grad(sum of per-sample losses, [Z_1..Z_L])`` returns the output
   gradients ``G``. Autograd only runs the nodes needed to reach the outputs, so the weight
   gradients (the ``G^T A`` matmuls of an ordinary backward) are never computed.
3. Per layer, squared per-sample gradient norms. For Linear (and Conv2d after
   ``F.unfold``, Embedding with indicator inputs) with ``T`` positions per sample, the
   "ghost norm" ``<A A^T, G G^T>`` (Goodfellow 2015, "Efficient per-example gradient
   computations", arXiv:1510.01799, for ``T = 1``; Li et al. 2022 for sequences) costs
   ``B T^2 (p + d)`` while instantiating per-sample gradients ``G_j^T A_j`` costs
   ``B T p d``; choosing per layer is the mixed ghost norm of Bu, Mao, Xu 2022, "Scalable
   and efficient training of large convolutional neural networks with differential privacy"
   (NeurIPS). Here ghost norms use float64 Gram matrices (exact to Higham's bound,
   :mod:`.rules`), so the ghost branch is chosen only where it takes less memory than
   instantiating (``16 T^2 + 8 T (p + d) < 4 p d`` bytes per example). LayerNorm and
   GroupNorm per-sample
   gradients are small and are instantiated from the normalised input. Any other layer owning
   parameters falls back to ``torch.func`` (``vmap`` of a ``vjp`` of that module alone), which
   materialises ``batch x params`` for that module only and re-runs its forward once.
4. Clip factors from the total norm over all trainable parameters: flat clipping
   ``c_j = min(1, C' / ||g_j||)``, or automatic clipping (Bu, Wang, Zha, Karypis
   2023, "Automatic clipping: differentially private deep learning made easier and
   stronger", NeurIPS) ``c_j = C' / (||g_j|| + stability)``, which normalises every
   per-sample gradient to norm below ``C``. ``C' = C (1 - 2^-12)``: the relative margin
   covers the float32 rounding of the norms (:func:`.precision.norm_margin`), so the
   bound is strict; an absolute one is not for norms above ~10.
5. The clipped sum per layer directly from ``A``, ``G`` and ``c`` (``sum_j c_j G_j^T A_j``,
   one matmul shaped like the non-private weight gradient; for a Conv2d on the ghost branch,
   the native weight-gradient kernel applied to ``c``-scaled ``G``), or from the per-sample
   gradients where step 3 instantiated them; no second backward.

``bias_only=True`` is DP-BiTFiT (Bu, Wang, Zha, Karypis 2022, "Differentially private
bias-term only fine-tuning of foundation models"): only biases are trained,
and the bias gradients of Linear and Conv2d layers need the output gradients only, so layer
inputs are not even stored. See also Dupuy et al. 2022, "An efficient DP-SGD mechanism for
large scale NLU models" (ICASSP), for the cost of per-sample clipping in practice.

Requirements on the model, which the BK method shares with every per-sample method: the batch
is dimension 0 of every trainable layer's input and output, examples do not interact in the
forward pass, the loss or the backward pass, and each parameter reaches the loss only through
its own module's output. :mod:`.checks` tests all of them on the first batch of two or more
examples and refuses a model that breaks them (random parts of the batch, run alone with
weighted losses, against the whole: outputs, losses, output gradients, and the per-layer sums
against autograd's gradient; a walk of the autograd graph; parameters and buffers unchanged).
BatchNorm, which mixes the examples of a batch, is refused, and so is
``nn.MultiheadAttention``, whose forward bypasses its sub-modules (use
:func:`mpcdp.train.layers.replace_multihead_attention`); parameters shared between modules
are refused. A layer input
modified in place after the layer read it is detected and refused. Fallback modules must be
deterministic and work under ``torch.func.vmap`` with a batch of one; torch's fused RNNs
(``nn.LSTM``, ``nn.GRU``) do not, so such a model is refused when first called, with the
advice to build the recurrence from ``nn.LSTMCell`` / ``nn.GRUCell`` (a cell called at
every step is handled: tensors inside tuple arguments, such as the cell's ``(h, c)``, are
split by example too).

Precision: whatever the model's dtype or autocast, norms and clipped sums are computed in
IEEE float32 (float64 for a float64 model): half-precision layer inputs, output gradients
and per-sample gradients are upcast first (:func:`.precision.upcast`), so the terms summed
are exactly those whose norms set the clip factors.

Modules: :mod:`.precision` (upcast, IEEE guard, bounded-error norms), :mod:`.rules` (the
per-layer book-keeping), :mod:`.checks` (first-use checks), :mod:`.clipper` (the class),
:mod:`.reference` (per-sample gradients by ``torch.func``, the tests' oracle).

Nothing happens at import time beyond defining names.
"""

from mpcdp.train.clipping.clipper import ClippedBatch, ClippingMode, PerSampleClipper
from mpcdp.train.clipping.reference import per_sample_gradients_reference

__all__ = [
    "ClippedBatch",
    "ClippingMode",
    "PerSampleClipper",
    "per_sample_gradients_reference",
]
