"""Stand-ins for vLLM in tests (no GPU, no vllm package)."""


class RecordingClient:
    """TRL's VLLMClient as a trainer and Gazal's sync use it: each weight update is kept as
    (metadata, [(name, copy of the tensor)]) in the order streamed; prefix-cache resets are counted."""

    def __init__(self):
        self.updates, self.resets = [], 0

    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def update_named_params(self, metadata, tensors):
        self.updates.append((list(metadata), [(n, t.detach().clone()) for n, t in tensors]))

    def reset_prefix_cache(self):
        self.resets += 1
