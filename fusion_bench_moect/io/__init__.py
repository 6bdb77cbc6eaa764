"""All disk I/O of the plugin: reading dense sources, writing MoE checkpoints."""
