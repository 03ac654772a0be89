"""The math layer: stable elementwise building blocks, the variational objectives, the primal
per-token losses and the DPO-family formulas, each with its closed-form derivative, and the
divergence registry that composes them (:mod:`.divergences`). Imports torch only."""
