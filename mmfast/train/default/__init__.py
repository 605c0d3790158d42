"""The embedded default: a tiny multimodal LLM built from its config and procedurally generated data
written in the real public formats, so that the default run exercises the same code as a real one."""
