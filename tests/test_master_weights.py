"""fp32 master weights stepped chunk by chunk equal plain fp32 AdamW, and bf16 weights follow them."""
import torch

from model.master_weights import MasterWeights


def test_chunked_master_step_equals_fp32_adamw():
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (128, 16), (7,)]
    init = [torch.randn(s) * 0.02 for s in shapes]
    bf16 = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in init[:3]] + [torch.nn.Parameter(init[3].clone())]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in bf16]
    groups = [{"params": bf16[:2], "lr": 2e-5}, {"params": bf16[2:], "lr": 1e-3}]
    mw = MasterWeights(groups, chunk_bytes=2048)  # several flushes per step
    opt = torch.optim.AdamW(mw.groups, weight_decay=0.0)
    ref_opt = torch.optim.AdamW([{"params": ref[:2], "lr": 2e-5}, {"params": ref[2:], "lr": 1e-3}], weight_decay=0.0)
    for _ in range(5):
        grads = [torch.randn(s) * 1e-3 for s in shapes]
        for p, r, g in zip(bf16, ref, grads):
            p.grad, r.grad = g.to(p.dtype), g.to(p.dtype).float()
        mw.step(opt)
        ref_opt.step()
    for (p, m), r in zip(mw.pairs, ref):
        torch.testing.assert_close(m.detach(), r.detach(), rtol=0, atol=0)
        assert torch.equal(p.detach(), r.detach().to(p.dtype))  # bf16 weights are the rounded masters
        assert opt.state[m]["step"] == 5  # each parameter stepped once per step despite the chunking
    assert bf16[3] is mw.pairs[3][1]  # fp32 parameters are their own masters
    # without masters most of these tiny updates would have vanished in bf16
    assert not torch.equal(bf16[0].detach(), init[0].to(torch.bfloat16))
