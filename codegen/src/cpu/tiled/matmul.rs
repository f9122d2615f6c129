//! The tile matmuls as generated f32x4 code, with the microkernels' contract (used when the
//! microkernel is off).

use super::super::gen::{flags, Gen};
use cranelift::prelude::*;

/// Generated matmuls with the microkernels' contract (f32x4 FMA), for when the
/// microkernel is off: `mm_qk(a, lda, kt, s, rows, d, bk)`.
pub(crate) fn gen_qk(g: &mut Gen, p: &[Value]) {
    let [a, lda, kt, s, rows, d, bk] = p.try_into().expect("7 params");
    let zero = g.iconst(0);
    g.for_range(zero, rows, &mut |g, r| {
        let arow = g.b.ins().imul(r, lda);
        let nc = g.b.ins().sshr_imm_u(bk, 3);
        let z = g.iconst(0);
        g.for_range(z, nc, &mut |g, cb| {
            let c = g.b.ins().ishl_imm_u(cb, 3);
            let zf = g.fconst(0.0);
            let zv = g.b.ins().splat(types::F32X4, zf);
            let acc0 = g.b.declare_var(types::F32X4);
            let acc1 = g.b.declare_var(types::F32X4);
            g.b.def_var(acc0, zv);
            g.b.def_var(acc1, zv);
            let z = g.iconst(0);
            g.for_range(z, d, &mut |g, x| {
                let ai = g.b.ins().iadd(arow, x);
                let av = g.load_f32(a, ai);
                let av = g.b.ins().splat(types::F32X4, av);
                let ko = g.b.ins().imul(x, bk);
                let ko = g.b.ins().iadd(ko, c);
                let kaddr = g.ptr_off(kt, ko);
                let k0 = g.b.ins().load(types::F32X4, flags(), kaddr, 0);
                let k1 = g.b.ins().load(types::F32X4, flags(), kaddr, 16);
                let a0 = g.b.use_var(acc0);
                let a1 = g.b.use_var(acc1);
                let a0 = g.b.ins().fma(av, k0, a0);
                let a1 = g.b.ins().fma(av, k1, a1);
                g.b.def_var(acc0, a0);
                g.b.def_var(acc1, a1);
            });
            let so = g.b.ins().imul(r, bk);
            let so = g.b.ins().iadd(so, c);
            let saddr = g.ptr_off(s, so);
            let a0 = g.b.use_var(acc0);
            let a1 = g.b.use_var(acc1);
            g.b.ins().store(flags(), a0, saddr, 0);
            g.b.ins().store(flags(), a1, saddr, 16);
        });
    });
    g.b.ins().return_(&[]);
}

/// `mm_pv(p, ldp, v, ldv, o, ldo, corr, rows, nk, dv)` in f32x4 (scalar channel tail).
pub(crate) fn gen_pv(g: &mut Gen, prm: &[Value]) {
    let [p, ldp, v, ldv, o, ldo, corr, rows, nk, dv] = prm.try_into().expect("10 params");
    let zero = g.iconst(0);
    g.for_range(zero, rows, &mut |g, r| {
        let has_corr = g.b.ins().icmp_imm_s(IntCC::NotEqual, corr, 0);
        let r4 = g.b.ins().ishl_imm_u(r, 2);
        let caddr = g.b.ins().iadd(corr, r4);
        let one = g.fconst(1.0);
        // Read corr[r] only when corr is not null (branch, not select: null is unmapped).
        let cvar = g.b.declare_var(types::F32);
        g.b.def_var(cvar, one);
        g.if_then(has_corr, &mut |g| {
            let c = g.b.ins().load(types::F32, flags(), caddr, 0);
            g.b.def_var(cvar, c);
        });
        let c = g.b.use_var(cvar);
        let cv = g.b.ins().splat(types::F32X4, c);
        let orow = g.b.ins().imul(r, ldo);
        let prow = g.b.ins().imul(r, ldp);
        let n4 = g.b.ins().sshr_imm_u(dv, 2);
        let z = g.iconst(0);
        g.for_range(z, n4, &mut |g, eb| {
            let e = g.b.ins().ishl_imm_u(eb, 2);
            let oo = g.b.ins().iadd(orow, e);
            let oaddr = g.ptr_off(o, oo);
            let acc = g.b.declare_var(types::F32X4);
            let x = g.b.ins().load(types::F32X4, flags(), oaddr, 0);
            let x = g.b.ins().fmul(x, cv);
            g.b.def_var(acc, x);
            let z = g.iconst(0);
            g.for_range(z, nk, &mut |g, c| {
                let pi = g.b.ins().iadd(prow, c);
                let pv = g.load_f32(p, pi);
                let pv = g.b.ins().splat(types::F32X4, pv);
                let vo = g.b.ins().imul(c, ldv);
                let vo = g.b.ins().iadd(vo, e);
                let vaddr = g.ptr_off(v, vo);
                let vv = g.b.ins().load(types::F32X4, flags(), vaddr, 0);
                let a = g.b.use_var(acc);
                let a = g.b.ins().fma(pv, vv, a);
                g.b.def_var(acc, a);
            });
            let a = g.b.use_var(acc);
            g.b.ins().store(flags(), a, oaddr, 0);
        });
        let e0 = g.b.ins().ishl_imm_u(n4, 2);
        g.for_range(e0, dv, &mut |g, e| {
            let oo = g.b.ins().iadd(orow, e);
            let x = g.load_f32(o, oo);
            let x = g.b.ins().fmul(x, c);
            let acc = g.b.declare_var(types::F32);
            g.b.def_var(acc, x);
            let z = g.iconst(0);
            g.for_range(z, nk, &mut |g, cc| {
                let pi = g.b.ins().iadd(prow, cc);
                let pv = g.load_f32(p, pi);
                let vo = g.b.ins().imul(cc, ldv);
                let vo = g.b.ins().iadd(vo, e);
                let vv = g.load_f32(v, vo);
                let a = g.b.use_var(acc);
                let a = g.b.ins().fma(pv, vv, a);
                g.b.def_var(acc, a);
            });
            let a = g.b.use_var(acc);
            g.store_f32(o, oo, a);
        });
    });
    g.b.ins().return_(&[]);
}
