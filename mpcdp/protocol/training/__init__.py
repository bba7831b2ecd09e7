"""Federated DP-SGD over one secure-aggregation session (docs/design.md, "Training": one
session's keys serve many rounds; "Arithmetic": clip -> scale -> randomized rounding -> noise
share -> mask).

A training session is one key agreement and many steps. Step s of a session:

1. the coordinator sends every site the model's parameters (all of them on the session's first
   step, the trainable ones after that);
2. each site Poisson-samples its own examples with rate q (secret CSPRNG), computes the sum
   of per-example clipped gradients (L2 norm <= C each), encodes it as
   ``round(g * 2^scale_bits)`` with unbiased randomized rounding, adds its Skellam noise share
   (sized for h = n - t honest sites) and its pairwise mask for round id s, and uploads it;
3. the coordinator adds the uploads: masks cancel, what is left is
   ``sum_sites round(g_i * 2^k) + Skellam(>= mu)``, which it decodes, divides by 2^k and by the
   expected batch size, and hands to its optimizer. The next step's parameters go back out.

Privacy, per site and per example (the site's own guarantee; it trusts nothing the coordinator
computed): adding or removing one example changes the site's clipped sum by a vector v with
``||v||_2 <= C``. Randomized rounding of a vector x is ``floor(x + u)`` for a uniform dither
u; for any fixed u each coordinate of the difference is ``floor`` or ``ceil`` of
``|v_k| 2^k``, so, for *every* u,

    Delta_2 <= C 2^k + sqrt(d),      Delta_1 <= sqrt(d) C 2^k + d

(worst case over the dither, hence valid for the mixture; it plays the role of the
Kairouz-Liu-Steinke 2021 inflated bound, with no failure probability). With the total noise
Skellam(mu), one step is an RDP release with those sensitivities (Agarwal-Kairouz-Liu 2021,
Cor. 3.6); Poisson subsampling amplifies it (mpcdp.dp.rdp.poisson_subsampled), and steps
compose. The site charges its ledger with :class:`~mpcdp.dp.events.Skellam` events of
``steps_per_charge`` steps before the first step of each block leaves it (charge before
release), under the query id ``run_id/session/block``: a resumed run in a new session pays
again for the steps it redoes, because they are new releases.

The site checks, before it signs its key: the dataset, the peers, t >= its min_colluders, the
clipping mode, the number of parameters of the architecture, the headroom of the ring, and
that the whole session fits its budget (and its max_epsilon_per_query).

Every step uploads ``num_params`` ring words; the noise share and the mask of step s + 1 are
built in a background thread while the coordinator sums step s (they do not depend on data),
so the critical path of a site is its gradient plus one vector addition.
"""

from mpcdp.protocol.training.site_engine import TrainingEngine
from mpcdp.protocol.training.source import GradientSource, TrainingTask
from mpcdp.protocol.training.train_spec import (
    CLIPPING_MODES,
    TrainSpec,
    choose_scale_bits,
    digest,
    max_batch_size,
    mechanism,
    run_event,
    sensitivities,
    step_event,
)
from mpcdp.protocol.training.training_session import TrainingClient, TrainingSession

__all__ = [
    "CLIPPING_MODES",
    "GradientSource",
    "TrainSpec",
    "TrainingClient",
    "TrainingEngine",
    "TrainingSession",
    "TrainingTask",
    "choose_scale_bits",
    "digest",
    "max_batch_size",
    "mechanism",
    "run_event",
    "sensitivities",
    "step_event",
]
