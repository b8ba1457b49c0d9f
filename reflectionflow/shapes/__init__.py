"""The shapes miniature: the whole method trained and measured on 2 CPU cores, with an exact checker.

A client of the core (the core never imports it). `world/` is the torch-free world: prompt specs in
GenEval's six categories, scenes, rendering, detection, the exact checker, edits and their sentences, the
editor, the rule-based reflector, flaw generators and (flawed, reflection, good) triplets. `pairs` and
`triplets` feed the recipes (prompt-image pairs; GenRef-format triplet shards), `vae`, `base` and
`corrector` are the recipes' LightningModules (each exports a product with its checker metrics, through
`evaluation`), `search` holds the search backends (checker as verifier and checker, rule-based reflector
and prompt refiner, the held-out prompt set), `corrections` reads a finished search's corrections back per
edit type, category and round.
"""
