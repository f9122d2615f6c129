//! The interpreter on small hand-written PTX with known results, so a wrong instruction
//! semantic cannot hide behind an emitter that makes the matching mistake.

use attnc_ptxsim::{Memory, Program};

fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn read(b: &[u8]) -> Vec<u32> {
    b.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// `out[t] = f(a[t], b[t])` for 8 threads in 2 blocks of 4, with `body` computing `%f3`
/// (or `%r3`) from `%f1, %f2` (`%r1, %r2`).
fn run(body: &str, a: &[u32], b: &[u32]) -> Result<Vec<u32>, String> {
    let src = format!(
        ".version 8.0
.target sm_80
.address_size 64

.visible .entry k(
\t.param .u64 p_a,
\t.param .u64 p_b,
\t.param .u64 p_o
)
{{
\t.reg .pred %p<4>;
\t.reg .s32 %r<8>;
\t.reg .f32 %f<8>;
\t.reg .u64 %rd<8>;
\tld.param.u64 %rd1, [p_a];
\tld.param.u64 %rd2, [p_b];
\tld.param.u64 %rd3, [p_o];
\tmov.u32 %r4, %ctaid.x;
\tmov.u32 %r5, %ntid.x;
\tmov.u32 %r6, %tid.x;
\tmad.lo.s32 %r7, %r4, %r5, %r6;
\tmul.wide.s32 %rd4, %r7, 4;
\tadd.s64 %rd5, %rd1, %rd4;
\tadd.s64 %rd6, %rd2, %rd4;
\tadd.s64 %rd7, %rd3, %rd4;
\tld.global.f32 %f1, [%rd5];
\tld.global.f32 %f2, [%rd6];
\tld.global.s32 %r1, [%rd5];
\tld.global.s32 %r2, [%rd6];
{body}
\tret;
}}
"
    );
    let p = Program::parse(&src).map_err(|e| e.to_string())?;
    let (mut ab, mut bb, mut ob) = (words(a), words(b), vec![0u8; 4 * a.len()]);
    let mut mem = Memory { buffers: vec![&mut ab, &mut bb, &mut ob] };
    let params = [Memory::address(0), Memory::address(1), Memory::address(2)];
    p.function("k").map_err(|e| e.to_string())?.launch(2, 4, &params, &mut mem).map_err(|e| e.to_string())?;
    Ok(read(&ob))
}

fn fl(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_fused_multiply_add_per_thread() {
    let a: Vec<f32> = (0..8).map(|x| x as f32).collect();
    let b: Vec<f32> = (0..8).map(|x| 0.5 * x as f32).collect();
    let got = run("\tfma.rn.f32 %f3, %f1, %f2, %f1;\n\tst.global.f32 [%rd7], %f3;", &fl(&a), &fl(&b)).unwrap();
    let want: Vec<u32> = (0..8).map(|x| (x as f32 * 0.5 * x as f32 + x as f32).to_bits()).collect();
    assert_eq!(got, want);
}

#[test]
fn integer_division_truncates_and_rem_keeps_the_dividend_sign() {
    let a: Vec<u32> = [-7i32, 7, -7, 7, 0, -1, 16, -16].iter().map(|&x| x as u32).collect();
    let b: Vec<u32> = [2i32, -2, -2, 2, 5, 16, 16, 16].iter().map(|&x| x as u32).collect();
    let div = run("\tdiv.s32 %r3, %r1, %r2;\n\tst.global.s32 [%rd7], %r3;", &a, &b).unwrap();
    assert_eq!(div.iter().map(|&x| x as i32).collect::<Vec<_>>(), [-3, -3, 3, 3, 0, 0, 1, -1]);
    let rem = run("\trem.s32 %r3, %r1, %r2;\n\tst.global.s32 [%rd7], %r3;", &a, &b).unwrap();
    assert_eq!(rem.iter().map(|&x| x as i32).collect::<Vec<_>>(), [-1, 1, -1, 1, 0, -1, 0, 0]);
}

#[test]
fn comparisons_follow_ieee_ordered_and_unordered_rules() {
    let nan = f32::NAN;
    let a = fl(&[1.0, nan, 2.0, nan, -0.0, 3.0, f32::INFINITY, 1.0]);
    let b = fl(&[1.0, 1.0, 1.0, nan, 0.0, nan, f32::INFINITY, 2.0]);
    let cmp = |c: &str| run(&format!("\tsetp.{c}.f32 %p1, %f1, %f2;\n\tselp.s32 %r3, 1, 0, %p1;\n\tst.global.s32 [%rd7], %r3;"), &a, &b).unwrap();
    assert_eq!(cmp("eq"), [1, 0, 0, 0, 1, 0, 1, 0]);
    assert_eq!(cmp("ne"), [0, 0, 1, 0, 0, 0, 0, 1]);
    assert_eq!(cmp("neu"), [0, 1, 1, 1, 0, 1, 0, 1]);
    assert_eq!(cmp("gtu"), [0, 1, 1, 1, 0, 1, 0, 0]);
    assert_eq!(cmp("nan"), [0, 1, 0, 1, 0, 1, 0, 0]);
    // max.NaN propagates NaN; plain max returns the number.
    let mx = run("\tmax.NaN.f32 %f3, %f1, %f2;\n\tst.global.f32 [%rd7], %f3;", &a, &b).unwrap();
    assert!(f32::from_bits(mx[1]).is_nan() && f32::from_bits(mx[5]).is_nan() && f32::from_bits(mx[7]) == 2.0);
    let mx = run("\tmax.f32 %f3, %f1, %f2;\n\tst.global.f32 [%rd7], %f3;", &a, &b).unwrap();
    assert_eq!(f32::from_bits(mx[1]), 1.0);
}

#[test]
fn conversions_round_as_their_modifier_says() {
    let a = fl(&[2.5, -2.5, 3.5, -0.5, 1e10, -1e10, f32::NAN, 7.9]);
    let b = fl(&[0.0; 8]);
    let f = |m: &str| run(&format!("\tcvt.{m}.f32.f32 %f3, %f1;\n\tst.global.f32 [%rd7], %f3;"), &a, &b).unwrap();
    let v = |w: Vec<u32>| w.iter().take(4).map(|&x| f32::from_bits(x)).collect::<Vec<_>>();
    assert_eq!(v(f("rni")), [2.0, -2.0, 4.0, -0.0]);
    assert_eq!(v(f("rmi")), [2.0, -3.0, 3.0, -1.0]);
    assert_eq!(v(f("rpi")), [3.0, -2.0, 4.0, -0.0]);
    // Toward zero, saturating; NaN gives 0.
    let i = run("\tcvt.rzi.s32.f32 %r3, %f1;\n\tst.global.s32 [%rd7], %r3;", &a, &b).unwrap();
    assert_eq!(i.iter().map(|&x| x as i32).collect::<Vec<_>>(), [2, -2, 3, 0, i32::MAX, i32::MIN, 0, 7]);
}

#[test]
fn a_register_read_before_it_is_written_is_an_error() {
    let e = run("\tadd.rn.f32 %f3, %f1, %f4;\n\tst.global.f32 [%rd7], %f3;", &fl(&[1.0; 8]), &fl(&[1.0; 8])).unwrap_err();
    assert!(e.contains("never written") && e.contains("%f4"), "{e}");
}

#[test]
fn an_access_outside_the_buffers_is_an_error() {
    // Thread 7 stores one element past the end of `o`.
    let e = run("\tst.global.f32 [%rd7+4], %f1;", &fl(&[1.0; 8]), &fl(&[1.0; 8])).unwrap_err();
    assert!(e.contains("out of bounds") && e.contains("block 1, thread 3"), "{e}");
}

/// What the interpreter does not implement yet (the tensor-core instructions) is refused
/// when parsing, so a kernel that uses it cannot pass for checked.
#[test]
fn instructions_it_does_not_run_are_refused_when_parsing() {
    let e = run("\twgmma.fence.sync.aligned;", &[0; 8], &[0; 8]).unwrap_err();
    assert!(e.contains("wgmma.fence.sync.aligned") && e.contains("not an instruction this interpreter runs"), "{e}");
    let e = run("\tmma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2}, {%r3}, {%f1, %f2, %f3, %f4};", &[0; 8], &[0; 8])
        .unwrap_err();
    assert!(e.contains("m16n8k8"), "{e}");
}

#[test]
fn branches_and_predicates_make_loops() {
    // out = sum of 0..a (as ints), a loop with a guarded backward branch.
    let a: Vec<u32> = (0..8).collect();
    let body = "\tmov.s32 %r3, 0;
\tmov.s32 %r4, 0;
$L1:
\tsetp.ge.s32 %p1, %r4, %r1;
\t@%p1 bra $L2;
\tadd.s32 %r3, %r3, %r4;
\tadd.s32 %r4, %r4, 1;
\tbra.uni $L1;
$L2:
\tst.global.s32 [%rd7], %r3;";
    let got = run(body, &a, &[0; 8]).unwrap();
    assert_eq!(got, (0..8u32).map(|n| n * n.saturating_sub(1) / 2).collect::<Vec<_>>());
}

/// A one-parameter kernel `k(p_o)` of `threads` threads in one block with `decls` (shared
/// arrays) and `body`; `%r1` holds the thread index and `%rd3` the address of `o[tid]`.
fn run_block(decls: &str, body: &str, threads: u32) -> Result<Vec<u32>, String> {
    let src = format!(
        ".version 8.0
.target sm_80
.address_size 64

.visible .entry k(
\t.param .u64 p_o
)
{{
{decls}
\t.reg .pred %p<4>;
\t.reg .s32 %r<12>;
\t.reg .u64 %rd<6>;
\tld.param.u64 %rd1, [p_o];
\tmov.u32 %r1, %tid.x;
\tmul.wide.s32 %rd2, %r1, 4;
\tadd.s64 %rd3, %rd1, %rd2;
{body}
\tret;
}}
"
    );
    let p = Program::parse(&src).map_err(|e| e.to_string())?;
    let mut ob = vec![0u8; 4 * threads as usize];
    let mut mem = Memory { buffers: vec![&mut ob] };
    p.function("k").map_err(|e| e.to_string())?.launch(1, threads, &[Memory::address(0)], &mut mem).map_err(|e| e.to_string())?;
    Ok(read(&ob))
}

/// A butterfly reduction over a warp: after 5 `shfl.sync.bfly` steps every lane holds the
/// sum of all 32 lane indices (496); a second warp does the same for its own lanes.
#[test]
fn a_shuffle_reduction_sums_the_warp() {
    let mut body = String::from("\tmov.s32 %r2, %r1;\n");
    for step in [16, 8, 4, 2, 1] {
        body += &format!("\tshfl.sync.bfly.b32 %r3, %r2, {step}, 31, -1;\n\tadd.s32 %r2, %r2, %r3;\n");
    }
    body += "\tst.global.s32 [%rd3], %r2;";
    let got = run_block("", &body, 64).unwrap();
    assert_eq!(&got[..32], &[496; 32][..]);
    assert_eq!(&got[32..], &[(32..64).sum::<u32>(); 32][..]);
    // shfl.sync.down with clamp 31: lanes past the end read their own value.
    let got = run_block("", "\tshfl.sync.down.b32 %r2, %r1, 3, 31, -1;\n\tst.global.s32 [%rd3], %r2;", 32).unwrap();
    assert_eq!(got, (0..32).map(|l| if l + 3 <= 31 { l + 3 } else { l }).collect::<Vec<u32>>());
    // shfl.sync.idx reads one lane for everyone.
    let got = run_block("", "\tshfl.sync.idx.b32 %r2, %r1, 5, 31, -1;\n\tst.global.s32 [%rd3], %r2;", 32).unwrap();
    assert_eq!(got, vec![5; 32]);
}

const SMEM: &str = "\t.shared .align 4 .b8 buf[256];";

/// Each thread writes its index to shared memory, the block syncs, each reads its
/// neighbour's: a rotation. Without the barrier the read is a race, reported as an error.
#[test]
fn shared_memory_needs_a_barrier_between_a_write_and_another_threads_read() {
    let body = |bar: &str| {
        format!(
            "\tmov.u32 %r2, buf;
\tshl.b32 %r3, %r1, 2;
\tadd.s32 %r4, %r2, %r3;
\tst.shared.s32 [%r4], %r1;
{bar}
\tadd.s32 %r5, %r1, 1;
\trem.s32 %r5, %r5, 64;
\tshl.b32 %r5, %r5, 2;
\tadd.s32 %r6, %r2, %r5;
\tld.shared.s32 %r7, [%r6];
\tst.global.s32 [%rd3], %r7;"
        )
    };
    let got = run_block(SMEM, &body("\tbar.sync 0;"), 64).unwrap();
    assert_eq!(got, (0..64).map(|t| (t + 1) % 64).collect::<Vec<u32>>());
    // Without it, thread 0 runs ahead and reads a byte thread 1 has not written yet.
    let e = run_block(SMEM, &body(""), 64).unwrap_err();
    assert!(e.contains("thread 0: reads shared byte 4, never written"), "{e}");
    // Threads reading their own slot, then a neighbour's written before: a race.
    let e = run_block(SMEM, &body("\tld.shared.s32 %r8, [%r4];"), 64).unwrap_err();
    assert!(e.contains("never written") || e.contains("race on shared byte"), "{e}");
    let racy = "\tmov.u32 %r2, buf;\n\tst.shared.s32 [%r2], %r1;\n\tld.shared.s32 %r7, [%r2];\n\tst.global.s32 [%rd3], %r7;";
    let e = run_block(SMEM, racy, 2).unwrap_err();
    assert!(e.contains("thread 1") && e.contains("race on shared byte 0: thread 0 wrote it"), "{e}");
    // Out of the array's 256 bytes.
    let e = run_block(SMEM, "\tmov.u32 %r2, buf;\n\tst.shared.s32 [%r2+256], %r1;", 1).unwrap_err();
    assert!(e.contains("out of bounds"), "{e}");
}

/// A shuffle that only half a warp reaches (the other half exited) names lanes that are
/// not there: an error, not a silent value.
#[test]
fn a_shuffle_missing_lanes_of_its_mask_is_an_error() {
    let body = "\tsetp.ge.s32 %p1, %r1, 16;\n\t@%p1 bra $L1;\n\tshfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;\n\tst.global.s32 [%rd3], %r2;\n$L1:";
    let e = run_block("", body, 32).unwrap_err();
    assert!(e.contains("only lanes 0xffff reached it"), "{e}");
    // With the mask of the lanes that take part it is fine.
    let body = "\tsetp.ge.s32 %p1, %r1, 16;\n\t@%p1 bra $L1;\n\tshfl.sync.bfly.b32 %r2, %r1, 1, 31, 65535;\n\tst.global.s32 [%rd3], %r2;\n$L1:";
    let got = run_block("", body, 32).unwrap();
    assert_eq!(&got[..16], &(0..16).map(|l| l ^ 1).collect::<Vec<u32>>()[..]);
}
