//! The tensor-core instructions on hand-written PTX with known results: `cp.async` into
//! shared memory, `ldmatrix` (plain and `.trans`), `mma.sync.m16n8k16` (bf16 and f16), and
//! `cvt.rn.bf16x2.f32`. Expected values are computed here from the PTX ISA's definitions,
//! written out again in each test (not from the interpreter's tables), so a wrong fragment
//! layout fails here even if the emitter made the matching mistake.

use attnc_ptxsim::{Memory, Program};

fn read(b: &[u8]) -> Vec<u32> {
    b.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// One block of `threads` threads: `k(p_in, p_out)` with `decls` and `body`. On entry `%r1`
/// is the thread index, `%rd1`/`%rd2` the input and output addresses, `%rd3` the address of
/// the thread's 16 input bytes (`in + 16·tid`), `%rd4` that of its output word
/// (`out + 4·tid`), and `%r2` the address of the shared array `smem` (1 KiB).
fn run_warp(body: &str, threads: u32, input: &[u8], out_words: usize) -> Result<Vec<u32>, String> {
    let src = format!(
        ".version 8.0
.target sm_80
.address_size 64

.visible .entry k(
\t.param .u64 p_in,
\t.param .u64 p_out
)
{{
\t.shared .align 16 .b8 smem[1024];
\t.reg .pred %p<4>;
\t.reg .b32 %r<40>;
\t.reg .f32 %f<24>;
\t.reg .u64 %rd<10>;
\tld.param.u64 %rd1, [p_in];
\tld.param.u64 %rd2, [p_out];
\tmov.u32 %r1, %tid.x;
\tmul.wide.s32 %rd5, %r1, 16;
\tadd.s64 %rd3, %rd1, %rd5;
\tmul.wide.s32 %rd6, %r1, 4;
\tadd.s64 %rd4, %rd2, %rd6;
\tmov.u32 %r2, smem;
{body}
\tret;
}}
"
    );
    let p = Program::parse(&src).map_err(|e| e.to_string())?;
    let mut ib = input.to_vec();
    let mut ob = vec![0u8; 4 * out_words];
    let mut mem = Memory { buffers: vec![&mut ib, &mut ob] };
    p.function("k").map_err(|e| e.to_string())?.launch(1, threads, &[Memory::address(0), Memory::address(1)], &mut mem).map_err(|e| e.to_string())?;
    Ok(read(&ob))
}

/// Every thread copies its 16 bytes of the input to the same place in `smem` with
/// `cp.async`, waits, and the block synchronizes.
const STAGE: &str = "\tmad.lo.s32 %r3, %r1, 16, %r2;
\tcp.async.ca.shared.global [%r3], [%rd3], 16;
\tcp.async.commit_group;
\tcp.async.wait_group 0;
\tbar.sync 0;
";

/// `%r6`: the shared address lane `l` gives `ldmatrix .x4` for a row-major 16×16 tile of
/// halves at `smem`: row `l % 16`, columns `8·(l / 16) …` (32 bytes a row).
const A_ROWS: &str = "\tand.b32 %r4, %r1, 15;
\tshr.u32 %r5, %r1, 4;
\tshl.b32 %r4, %r4, 5;
\tshl.b32 %r5, %r5, 4;
\tadd.s32 %r6, %r4, %r5;
\tadd.s32 %r6, %r6, %r2;
";

fn halves(m: &[u16]) -> Vec<u8> {
    m.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A 16×16 matrix of distinct halves, row-major: element (r, c) holds `r·16 + c + 1`.
fn distinct() -> Vec<u16> {
    (0..256).map(|x| x as u16 + 1).collect()
}

/// `ldmatrix .x4` with lane `l` giving the address of row `l % 16`, columns
/// `8·(l / 16) …`: matrix `m`'s row `r` is the row lane `8m + r` points at. The PTX ISA:
/// without `.trans` lane `l` gets row `l / 4`, columns `2(l % 4)`, `2(l % 4) + 1` of each
/// matrix (low half first); with `.trans`, rows `2(l % 4)`, `2(l % 4) + 1` of column `l / 4`.
#[test]
fn ldmatrix_gives_each_lane_the_halves_the_isa_says() {
    let m = distinct();
    for trans in [false, true] {
        let body = format!(
            "{STAGE}{A_ROWS}\tldmatrix.sync.aligned.m8n8.x4{}.shared.b16 {{%r10, %r11, %r12, %r13}}, [%r6];
\tmul.wide.s32 %rd7, %r1, 16;
\tadd.s64 %rd8, %rd2, %rd7;
\tst.global.b32 [%rd8], %r10;
\tst.global.b32 [%rd8+4], %r11;
\tst.global.b32 [%rd8+8], %r12;
\tst.global.b32 [%rd8+12], %r13;",
            if trans { ".trans" } else { "" }
        );
        let got = run_warp(&body, 32, &halves(&m), 128).unwrap();
        for l in 0..32 {
            for mat in 0..4 {
                // Row r of matrix `mat` is matrix row (8·mat + r) % 16 at column block (8·mat + r) / 16.
                let at = |r: usize, c: usize| {
                    let lane = 8 * mat + r;
                    m[(lane % 16) * 16 + (lane / 16) * 8 + c] as u32
                };
                let (lo, hi) = if trans { (at(2 * (l % 4), l / 4), at(2 * (l % 4) + 1, l / 4)) } else { (at(l / 4, 2 * (l % 4)), at(l / 4, 2 * (l % 4) + 1)) };
                assert_eq!(got[4 * l + mat], lo | hi << 16, "lane {l}, matrix {mat}, trans {trans}");
            }
        }
    }
}

fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}
fn f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// `D = A·B + C` for one m16n8k16 tile, the fragments written straight from the PTX ISA's
/// tables (lane `l`, `g = l / 4`, `q = l % 4`): A's four registers hold (row, column)
/// `(g, 2q)`, `(g + 8, 2q)`, `(g, 2q + 8)`, `(g + 8, 2q + 8)` and the next column in the
/// high half; B's two hold (k, n) `(2q, g)` and `(2q + 8, g)` and the next k; C's and D's
/// four hold `(g, 2q)`, `(g, 2q + 1)`, `(g + 8, 2q)`, `(g + 8, 2q + 1)`. Each lane reads its
/// ten input words from `in + 40·lane` and writes D to `out + 16·lane`.
fn one_tile(a: &[[f32; 16]; 16], b: &[[f32; 8]; 16], c: &[[f32; 8]; 16], to_half: fn(f32) -> u16, ty: &str) -> Vec<u32> {
    let mut input = Vec::new();
    for l in 0..32 {
        let (g, q) = (l / 4, 2 * (l % 4));
        let pack = |lo: f32, hi: f32| to_half(lo) as u32 | (to_half(hi) as u32) << 16;
        for (r, cc) in [(g, q), (g + 8, q), (g, q + 8), (g + 8, q + 8)] {
            input.extend(pack(a[r][cc], a[r][cc + 1]).to_le_bytes());
        }
        for k in [q, q + 8] {
            input.extend(pack(b[k][g], b[k + 1][g]).to_le_bytes());
        }
        for (r, cc) in [(g, q), (g, q + 1), (g + 8, q), (g + 8, q + 1)] {
            input.extend(c[r][cc].to_bits().to_le_bytes());
        }
    }
    let mut body = String::from("\tmul.wide.s32 %rd7, %r1, 40;\n\tadd.s64 %rd8, %rd1, %rd7;\n");
    for n in 0..6 {
        body += &format!("\tld.global.b32 %r{}, [%rd8+{}];\n", 10 + n, 4 * n);
    }
    for n in 0..4 {
        body += &format!("\tld.global.f32 %f{}, [%rd8+{}];\n", 1 + n, 24 + 4 * n);
    }
    body += &format!(
        "\tmma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{%f5, %f6, %f7, %f8}}, {{%r10, %r11, %r12, %r13}}, {{%r14, %r15}}, {{%f1, %f2, %f3, %f4}};
\tmul.wide.s32 %rd7, %r1, 16;
\tadd.s64 %rd9, %rd2, %rd7;
\tst.global.f32 [%rd9], %f5;
\tst.global.f32 [%rd9+4], %f6;
\tst.global.f32 [%rd9+8], %f7;
\tst.global.f32 [%rd9+12], %f8;"
    );
    run_warp(&body, 32, &input, 128).unwrap()
}

/// The tile's D back in matrix form from the lanes' registers (the C/D table).
fn unpack_d(words: &[u32]) -> [[f32; 8]; 16] {
    let mut d = [[f32::NAN; 8]; 16];
    for l in 0..32 {
        let (g, q) = (l / 4, 2 * (l % 4));
        for (n, (r, c)) in [(g, q), (g, q + 1), (g + 8, q), (g + 8, q + 1)].into_iter().enumerate() {
            d[r][c] = f32::from_bits(words[4 * l + n]);
        }
    }
    d
}

type A = [[f32; 16]; 16];
type B = [[f32; 8]; 16];

fn inputs() -> (A, B, B) {
    let mut a = [[0f32; 16]; 16];
    let mut b = [[0f32; 8]; 16];
    let mut c = [[0f32; 8]; 16];
    for r in 0..16 {
        for (k, x) in a[r].iter_mut().enumerate() {
            // Small integers and halves: exact in bf16 and f16, and so is every sum.
            *x = ((r * 7 + k * 3) % 11) as f32 - 5.0;
        }
        for n in 0..8 {
            b[r][n] = 0.5 * (((r * 5 + n * 13) % 9) as f32 - 4.0);
            c[r][n] = (r * 8 + n) as f32;
        }
    }
    (a, b, c)
}

fn matmul(a: &[[f32; 16]; 16], b: &[[f32; 8]; 16], c: &[[f32; 8]; 16]) -> [[f32; 8]; 16] {
    let mut d = [[0f32; 8]; 16];
    for r in 0..16 {
        for n in 0..8 {
            d[r][n] = c[r][n] + (0..16).map(|k| a[r][k] * b[k][n]).sum::<f32>();
        }
    }
    d
}

#[test]
fn one_mma_tile_multiplies_as_the_fragment_tables_say() {
    let (a, b, c) = inputs();
    let want = matmul(&a, &b, &c);
    assert_eq!(unpack_d(&one_tile(&a, &b, &c, bf16, "bf16")), want);
    assert_eq!(unpack_d(&one_tile(&a, &b, &c, f16, "f16")), want);
    // One element of A moved: only its row of D changes.
    let mut a2 = a;
    a2[13][2] += 1.0;
    let d2 = unpack_d(&one_tile(&a2, &b, &c, bf16, "bf16"));
    for r in 0..16 {
        for n in 0..8 {
            let expect = if r == 13 { want[r][n] + b[2][n] } else { want[r][n] };
            assert_eq!(d2[r][n], expect, "({r}, {n})");
        }
    }
}

/// The flash-attention data path: A (16×16, row-major in shared memory) by `ldmatrix .x4`,
/// B for `A·Bᵀ`-style products from Bᵀ stored row-major (8×16, like K's rows) by
/// `ldmatrix .x2`, and B from a row-major 16×8 matrix (like V's rows) by `ldmatrix .x2.trans`;
/// both products equal the plain matrix product.
#[test]
fn ldmatrix_fragments_feed_mma() {
    let (a, b, c) = inputs();
    let want = matmul(&a, &b, &c);
    // smem: A at 0 (512 bytes), then either Bᵀ (8 rows of 16) or B (16 rows of 8), 256 bytes.
    let mut m: Vec<u16> = a.iter().flat_map(|r| r.iter().map(|&x| bf16(x))).collect();
    let bt: Vec<u16> = (0..8).flat_map(|n| (0..16).map(move |k| (n, k))).map(|(n, k)| bf16(b[k][n])).collect();
    let bn: Vec<u16> = (0..16).flat_map(|k| (0..8).map(move |n| (k, n))).map(|(k, n)| bf16(b[k][n])).collect();
    let mut cw = Vec::new();
    for l in 0..32 {
        let (g, q) = (l / 4, 2 * (l % 4));
        for (r, cc) in [(g, q), (g, q + 1), (g + 8, q), (g + 8, q + 1)] {
            cw.extend(c[r][cc].to_bits().to_le_bytes());
        }
    }
    for (b_rows, trans) in [(&bt, false), (&bn, true)] {
        let mut data = m.clone();
        data.extend(b_rows.iter());
        data.resize(512, 0);
        let mut input = halves(&data);
        input.extend(&cw);
        // A: lane l → row l % 16, column block l / 16. Bᵀ (x2): lane l < 16 → row l % 8,
        // column block l / 8. B (x2.trans): lane l < 16 → row l.
        let b_addr = if trans {
            "\tand.b32 %r7, %r1, 15;\n\tshl.b32 %r7, %r7, 4;\n"
        } else {
            "\tand.b32 %r7, %r1, 7;\n\tshl.b32 %r7, %r7, 5;\n\tshr.u32 %r8, %r1, 3;\n\tand.b32 %r8, %r8, 1;\n\tshl.b32 %r8, %r8, 4;\n\tadd.s32 %r7, %r7, %r8;\n"
        };
        let body = format!(
            "{STAGE}{A_ROWS}\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {{%r10, %r11, %r12, %r13}}, [%r6];
\tcp.async.ca.shared.global [%r3+512], [%rd3+512], 16;
\tcp.async.wait_all;
\tbar.sync 0;
{b_addr}\tadd.s32 %r7, %r7, 512;
\tadd.s32 %r7, %r7, %r2;
\tldmatrix.sync.aligned.m8n8.x2{}.shared.b16 {{%r14, %r15}}, [%r7];
\tmul.wide.s32 %rd7, %r1, 16;
\tadd.s64 %rd8, %rd1, %rd7;
\tld.global.f32 %f1, [%rd8+1024];
\tld.global.f32 %f2, [%rd8+1028];
\tld.global.f32 %f3, [%rd8+1032];
\tld.global.f32 %f4, [%rd8+1036];
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{%f5, %f6, %f7, %f8}}, {{%r10, %r11, %r12, %r13}}, {{%r14, %r15}}, {{%f1, %f2, %f3, %f4}};
\tadd.s64 %rd9, %rd2, %rd7;
\tst.global.f32 [%rd9], %f5;
\tst.global.f32 [%rd9+4], %f6;
\tst.global.f32 [%rd9+8], %f7;
\tst.global.f32 [%rd9+12], %f8;",
            if trans { ".trans" } else { "" }
        );
        let got = run_warp(&body, 32, &input, 128).unwrap();
        assert_eq!(unpack_d(&got), want, "B by ldmatrix{}", if trans { ".trans" } else { "" });
        m = a.iter().flat_map(|r| r.iter().map(|&x| bf16(x))).collect();
    }
}

/// `cvt.rn.bf16x2.f32 d, a, b` puts `a` in the high half and `b` in the low half, rounded
/// to nearest even.
#[test]
fn cvt_packs_the_first_operand_high() {
    let body = "\tmov.f32 %f1, 0f3F800000;\n\tmov.f32 %f2, 0fC0400000;\n\tcvt.rn.bf16x2.f32 %r10, %f1, %f2;\n\tst.global.b32 [%rd4], %r10;\n\tmov.f32 %f3, 0f3F808000;\n\tcvt.rn.f16x2.f32 %r11, %f3, %f3;\n\tst.global.b32 [%rd4+4], %r11;";
    let got = run_warp(body, 1, &[0; 16], 2).unwrap();
    assert_eq!(got[0], (bf16(1.0) as u32) << 16 | bf16(-3.0) as u32);
    // 1.00390625 is exactly representable in f16 but halfway between two bf16 values.
    assert_eq!(got[1], (f16(1.003_906_3) as u32) << 16 | f16(1.003_906_3) as u32);
    assert_eq!(bf16(1.003_906_3), bf16(1.0), "ties to even");
}

/// A source size below the copy size zero-fills the rest (the tails of K/V tiles).
#[test]
fn cp_async_zero_fills_past_the_source_size() {
    let input: Vec<u8> = (1..=64).collect();
    let body = "\tmad.lo.s32 %r3, %r1, 16, %r2;\n\tcp.async.cg.shared.global [%r3], [%rd3], 16, 6;\n\tcp.async.wait_all;\n\tld.shared.b32 %r10, [%r3+4];\n\tst.global.b32 [%rd4], %r10;";
    let got = run_warp(body, 4, &input, 4).unwrap();
    for t in 0..4u32 {
        let b = 16 * t + 5;
        assert_eq!(got[t as usize], b | (b + 1) << 8, "thread {t}: bytes 4, 5 copied, 6 and 7 zero");
    }
}

#[test]
fn cp_async_errors_are_caught() {
    // Reading the destination before waiting.
    let early = "\tmad.lo.s32 %r3, %r1, 16, %r2;\n\tcp.async.ca.shared.global [%r3], [%rd3], 16;\n\tcp.async.commit_group;\n\tld.shared.b32 %r10, [%r3];\n\tcp.async.wait_group 0;";
    let e = run_warp(early, 1, &[0; 16], 1).unwrap_err();
    assert!(e.contains("cp.async") && e.contains("still in flight"), "{e}");
    // wait_group 1 leaves the newest group in flight.
    let newest = "\tmad.lo.s32 %r3, %r1, 16, %r2;\n\tcp.async.ca.shared.global [%r3], [%rd3], 16;\n\tcp.async.commit_group;\n\tcp.async.ca.shared.global [%r3+512], [%rd3], 16;\n\tcp.async.commit_group;\n\tcp.async.wait_group 1;\n\tld.shared.b32 %r10, [%r3];\n\tld.shared.b32 %r11, [%r3+512];\n\tcp.async.wait_group 0;";
    let e = run_warp(newest, 1, &[0; 16], 1).unwrap_err();
    assert!(e.contains("line") || e.contains("still in flight"), "{e}");
    assert!(e.contains("byte 512"), "the first group landed, the second did not: {e}");
    // Exiting with a copy never waited for.
    let e = run_warp("\tcp.async.ca.shared.global [%r2], [%rd3], 16;\n\tcp.async.commit_group;", 1, &[0; 16], 1).unwrap_err();
    assert!(e.contains("never waited"), "{e}");
    // Another thread reading what a copy wrote, without a barrier: a race.
    let race = "\tmad.lo.s32 %r3, %r1, 16, %r2;\n\tcp.async.ca.shared.global [%r3], [%rd3], 16;\n\tcp.async.wait_all;\n\txor.b32 %r4, %r1, 1;\n\tmad.lo.s32 %r5, %r4, 16, %r2;\n\tld.shared.b32 %r10, [%r5];";
    // (thread 0 runs first and finds its neighbour's bytes not yet landed.)
    let e = run_warp(race, 2, &[0; 32], 2).unwrap_err();
    assert!(e.contains("thread 0: reads shared byte 16, never written"), "{e}");
    // Thread 1 reading thread 0's landed copy in the same epoch: a race.
    let race1 = race.replace("xor.b32 %r4, %r1, 1", "mov.s32 %r4, 0");
    let e = run_warp(&race1, 2, &[0; 32], 2).unwrap_err();
    assert!(e.contains("thread 1") && e.contains("race on shared byte 0: thread 0 wrote it"), "{e}");
    // With the barrier it is fine, and each thread reads its neighbour's bytes.
    let ok = race.replace("\txor.b32", "\tbar.sync 0;\n\txor.b32") + "\n\tst.global.b32 [%rd4], %r10;";
    let input: Vec<u8> = (0..32).collect();
    assert_eq!(run_warp(&ok, 2, &input, 2).unwrap(), [u32::from_le_bytes([16, 17, 18, 19]), u32::from_le_bytes([0, 1, 2, 3])]);
    // Misaligned.
    let e = run_warp("\tcp.async.ca.shared.global [%r2+4], [%rd3], 16;\n\tcp.async.wait_all;", 1, &[0; 16], 1).unwrap_err();
    assert!(e.contains("not aligned"), "{e}");
}

#[test]
fn warp_wide_tensor_instructions_need_the_whole_warp() {
    let body = "\tldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r10}, [%r2];";
    let e = run_warp(body, 16, &[0; 256], 16).unwrap_err();
    assert!(e.contains("needs all 32 lanes"), "{e}");
    let e = run_warp("\tadd.s32 %r6, %r2, 4;\n\tldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r10}, [%r6];", 32, &[0; 512], 32).unwrap_err();
    assert!(e.contains("16-byte aligned"), "{e}");
    // An mma operand never written.
    let e = run_warp(
        "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f5, %f6, %f7, %f8}, {%r10, %r11, %r12, %r13}, {%r14, %r15}, {%f1, %f2, %f3, %f4};",
        32,
        &[0; 512],
        32,
    )
    .unwrap_err();
    assert!(e.contains("never written"), "{e}");
}
