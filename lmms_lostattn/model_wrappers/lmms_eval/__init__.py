"""lmms-eval glue: one small module per architecture family (``LostAttnX(LostAttnMixin, <lmms-eval's class>)``),
the statistics in lmms-eval's outputs (:mod:`.reporting`), ``lostattn reproduce`` (:mod:`.reproduce`) and the
lmms-eval internals it relies on (:mod:`.contacts`)."""
