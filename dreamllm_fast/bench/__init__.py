"""`dreamllm-fast bench`: stage-by-stage measurement against baselines and the hardware limit."""
