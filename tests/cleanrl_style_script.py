"""A CleanRL-style single-file training script (REINFORCE on CartPole-v1) logging through
TensorBoard's SummaryWriter. tests/test_summary_writer.py runs it as it is, and again with only
its SummaryWriter import line changed to steplog's, and compares what each stored."""

import argparse
import random
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn, optim
from torch.utils.tensorboard import SummaryWriter


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exp-name", type=str, default="reinforce")
    parser.add_argument("--env-id", type=str, default="CartPole-v1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--gamma", type=float, default=0.99)
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()),
    )
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    env = gym.wrappers.RecordEpisodeStatistics(gym.make(args.env_id))
    policy = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    optimizer = optim.Adam(policy.parameters(), lr=args.learning_rate)
    global_step = 0
    start_time = time.time()
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=args.seed + episode)
        log_probs, rewards, done = [], [], False
        while not done:
            dist = torch.distributions.Categorical(
                logits=policy(torch.as_tensor(obs, dtype=torch.float32)))
            action = dist.sample()
            obs, reward, terminated, truncated, info = env.step(action.item())
            log_probs.append(dist.log_prob(action))
            rewards.append(float(reward))
            global_step += 1
            done = terminated or truncated
        writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
        writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)

        returns, running = [], 0.0
        for r in reversed(rewards):
            running = r + args.gamma * running
            returns.insert(0, running)
        ret = torch.tensor(returns)
        loss = -(torch.stack(log_probs) * (ret - ret.mean())).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        writer.add_scalar("losses/policy_loss", loss, global_step)
        writer.add_scalars("returns", {"first": returns[0], "last": returns[-1]}, global_step)
        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)),
                          global_step)
    env.close()
    writer.close()
