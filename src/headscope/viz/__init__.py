"""Pictures of heads: matplotlib figures that leave matplotlib's global state alone
(:mod:`headscope.viz.figures`) and attention patterns over real tokens
(:mod:`headscope.viz.patterns`), which render in Jupyter, in the atlas report and as static SVG."""
