//! Rows of floats in memory: contiguous-row copies, f32x4 loads and stores at float
//! offsets, fills.

use super::super::gen::Gen;
use attnc_ir::Expr;
use cranelift::codegen::ir::MemFlagsData;
use cranelift::prelude::*;

impl Gen<'_, '_> {
    /// When `e` reads a row of f32s along `var` ([`attnc_ir::analysis::row_access`]), the
    /// address of its element at `var = 0` and a run-time flag: the last axis is contiguous
    /// and holds at least `len` elements, so `var in 0..len` reads `len` consecutive floats
    /// (the packs then copy rows with vector loads).
    pub(crate) fn contiguous_row(&mut self, e: &Expr, var: &str, len: Value) -> Option<(Value, Value)> {
        let row = attnc_ir::analysis::row_access(self.kernel, e, var)?;
        let tv = self.tens[row.tensor].clone();
        let off = self.clamped_offset(&tv, row.prefix.iter().enumerate());
        let bytes = self.b.ins().ishl_imm_u(off, 2);
        let addr = self.b.ins().iadd(tv.base, bytes);
        let axis = row.prefix.len();
        let covers = self.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, tv.ext[axis], len);
        let unit = self.b.ins().icmp_imm_s(IntCC::Equal, tv.stride[axis], 1);
        Some((addr, self.b.ins().band(covers, unit)))
    }

    /// When the kernel's value is `v[…, j, e]` (`j` the second-to-last index and in no other,
    /// `e` the last): the address of key 0's value row, the distance between keys' rows in
    /// floats, and a run-time flag that the rows are contiguous along `e` (at least `ev`
    /// long) and the key axis holds all `mj` keys. `tile` then reads the values in place
    /// and `pack` leaves them alone; `b` and `h` must be bound.
    pub(super) fn value_rows(&mut self, mj: Value, ev: Value) -> Option<(Value, Value, Value)> {
        self.key_rows(&self.kernel.value, "e", ev, mj)
    }

    /// Where the tile reads its keys in place ([`super::SoftmaxKernels::qk_direct`]): key 0's
    /// row of the one panel's key factor, the keys' row distance and a run-time flag (rows
    /// along the channels, every key, at most [`crate::cpu::microkernel::DIRECT_ROWS`] query
    /// rows). `pack` and `tile` ask the same question; `b` and `h` must be bound.
    pub(super) fn direct_keys(&mut self, plan: &crate::schedule::tiled::TiledPlan, mj: Value) -> Option<(Value, Value, Value)> {
        if !self.direct || !super::direct_keys_apply(plan) {
            return None;
        }
        let dot = &plan.panels[0];
        if plan.channels_all().as_ref() != Some(&dot.len) {
            return None;
        }
        let len = self.expr(&dot.len);
        let (addr, ldk, rows_ok) = self.key_rows(&dot.b, &dot.r, len, mj)?;
        let ni = self.expr(&self.kernel.iter.i.to_expr());
        let few = self.b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, ni, crate::cpu::microkernel::DIRECT_ROWS);
        Some((addr, ldk, self.b.ins().band(rows_ok, few)))
    }

    /// `e` reads `t[…, j, var]` (`j` the second-to-last index and in no other, `var` the
    /// last): the address of its row at `j = 0`, the keys' row distance, and whether the rows
    /// are contiguous along `var` for `len` floats and the key axis holds `mj` keys.
    fn key_rows(&mut self, e: &Expr, var: &str, len: Value, mj: Value) -> Option<(Value, Value, Value)> {
        let k = self.kernel;
        let row = attnc_ir::analysis::row_access(k, e, var)?;
        let (last, rest) = row.prefix.split_last()?;
        if *last != Expr::var("j") || rest.iter().any(|x| x.free_vars().contains("j")) {
            return None;
        }
        let zero = self.iconst(0);
        self.bind("j", zero);
        let found = self.contiguous_row(e, var, len);
        self.unbind(1);
        let (addr, ok) = found?;
        let tv = self.tens[row.tensor].clone();
        let axis = rest.len();
        let keys = self.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, tv.ext[axis], mj);
        Some((addr, tv.stride[axis], self.b.ins().band(ok, keys)))
    }

    /// Copies `len` floats from `src` (a byte address), times `factor` when given: f32x4
    /// loads, then a scalar tail. `store(x, v)` writes each value `v` (an F32X4 or an F32)
    /// for float offset `x` wherever the caller's layout puts it.
    pub(super) fn copy_row(&mut self, src: Value, len: Value, factor: Option<Value>, store: &mut dyn FnMut(&mut Self, Value, Value)) {
        let fv = factor.map(|f| self.b.ins().splat(types::F32X4, f));
        self.for_lanes(len, &mut |g, x, ty| {
            let v = g.load_at(src, x, ty);
            let f = if ty == types::F32X4 { fv } else { factor };
            let v = match f {
                Some(f) => g.b.ins().fmul(v, f),
                None => v,
            };
            store(g, x, v);
        });
    }

    /// `body(x, ty)` for `x in 0..len`: f32x4 steps (`ty` F32X4, `x` a multiple of 4), four
    /// to a loop iteration while 16 floats remain (a loop step costs as much as a vector
    /// copy), then single f32x4 steps, then a scalar tail (`ty` F32).
    pub(crate) fn for_lanes(&mut self, len: Value, body: &mut dyn FnMut(&mut Self, Value, Type)) {
        let n16 = self.b.ins().sshr_imm_u(len, 4);
        let zero = self.iconst(0);
        self.for_range(zero, n16, &mut |g, x16| {
            let x = g.b.ins().imul_imm_s(x16, 16);
            for step in 0..4 {
                let xs = g.b.ins().iadd_imm_s(x, 4 * step);
                body(g, xs, types::F32X4);
            }
        });
        let first = self.b.ins().ishl_imm_u(n16, 2);
        let nvec = self.b.ins().sshr_imm_u(len, 2);
        self.for_range(first, nvec, &mut |g, x4| {
            let x = g.b.ins().imul_imm_s(x4, 4);
            body(g, x, types::F32X4);
        });
        let tail = self.b.ins().imul_imm_s(nvec, 4);
        self.for_range(tail, len, &mut |g, x| body(g, x, types::F32));
    }

    /// A value of type `ty` (F32 or F32X4) at float offset `x` of the byte address `base`
    /// (unaligned).
    pub(crate) fn load_at(&mut self, base: Value, x: Value, ty: Type) -> Value {
        let bytes = self.b.ins().ishl_imm_u(x, 2);
        let a = self.b.ins().iadd(base, bytes);
        self.b.ins().load(ty, MemFlagsData::new().with_notrap(), a, 0)
    }

    /// A scalar `v` as a value of type `ty` (F32 or F32X4).
    pub(super) fn lanes_of(&mut self, v: Value, ty: Type) -> Value {
        if ty == types::F32X4 {
            self.b.ins().splat(types::F32X4, v)
        } else {
            v
        }
    }

    /// `len` zeros at `base` (a float workspace).
    pub(super) fn zero_fill(&mut self, base: Value, len: Value) {
        self.for_lanes(len, &mut |g, x, ty| {
            let z = g.fconst(0.0);
            let z = g.lanes_of(z, ty);
            g.store_at(base, x, z);
        });
    }

    /// Stores a value of [`Self::copy_row`] into a row of floats at `base + row` (vector or
    /// scalar, unaligned).
    pub(super) fn store_row(&mut self, base: Value, row: Value, x: Value, v: Value) {
        let off = self.b.ins().iadd(row, x);
        self.store_at(base, off, v);
    }

    /// Stores `v` (F32 or F32X4) at float offset `x` of the byte address `base` (unaligned).
    pub(super) fn store_at(&mut self, base: Value, x: Value, v: Value) {
        let bytes = self.b.ins().ishl_imm_u(x, 2);
        let a = self.b.ins().iadd(base, bytes);
        self.b.ins().store(MemFlagsData::new().with_notrap(), v, a, 0);
    }

    pub(crate) fn ptr_off(&mut self, base: Value, floats: Value) -> Value {
        let bytes = self.b.ins().ishl_imm_u(floats, 2);
        self.b.ins().iadd(base, bytes)
    }
}
