"""Studies: workflows built on a detector, one module per paper.

A detector (``headscope.detectors``) defines a head role: its config, its score, its
significance rule and its validation task. A study is what a paper does *with* those heads once
they are found: steering sweeps and transfer tables of memory heads (``studies.memory_context``),
method comparisons (a head against the letter logits) and split-stability studies of select-and-copy heads (``studies.select_copy``),
needle heatmaps (``studies.retrieval``), mod-10 features and effective-OV conventions of successor
heads (``studies.successor``), and held-out attack success of safety heads beside the refusal
direction (``studies.safety``). Sahara and the attack success rate stay in
``headscope.detectors.safety``: the detector's score runs Sahara (``sahara_steps``) and its
validation task measures attack success.

Studies import detectors, never the reverse: no module under ``headscope.detectors`` imports
``headscope.studies``.
"""
