"""The autograd layer: the fused primitive (:mod:`.token_stats`), the one-pass fused loss
(:mod:`.fused`) and the choice between them (:mod:`.evaluate`). Eager only; the inputs are trusted
(the API layer checked them) and the data checks run once per call."""
