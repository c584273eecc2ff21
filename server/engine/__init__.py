"""The engine room: everything between a queued request and its sampled tokens (docs/DESIGN.md).

The HTTP process imports from here only the clients (`client`, `thread_client`,
`process_client`); they speak server/contract.py. The rest computes, in the core's thread or
process: `llm_engine` drives `scheduler`, `block_manager`, `model_runner` (+ `cuda_graphs`),
`sampler` and `output_processor` one step at a time; `core` is its loop.
"""
