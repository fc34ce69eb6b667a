"""What a run asks for: the plugin's arguments parsed from ``model_args`` and resolved against a model
(``Intervention``, ``StatsConfig``, one ``spec_hash``)."""
