//! `tandem-trainer`: rollout buffer, advantages, losses, KL, optimizer steps,
//! checkpoints and the weight publisher; offline stages (SFT, RM, DPO). The model,
//! its logprobs and the optimizer come from `tandem_model`.
