"""Host glue, one folder per harness (``lmms_eval/``, ``lm_eval/``), over what both share: the plugin's arguments
and scope (:mod:`.plugin`), the rows-to-requests ledger (:mod:`.rows`) and the statistics rows (:mod:`.results`)."""
