"""The residual statistics: pure metrics (RID, MixIG, ...), the recorder of each layer's updates, the per-prompt
collector, and the aggregation into table rows."""
