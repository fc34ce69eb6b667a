"""lm-evaluation-harness glue: ``lostattn-hf`` / ``lostattn-hf-multimodal`` (:mod:`.models`), the statistics rows in
lm-eval's results (:mod:`.reporting`) and the ``lostattn-lm-eval`` command (:mod:`.launcher`). Imported only there:
lm-eval is an optional extra."""
