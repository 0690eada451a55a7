//! RFC 9162 §2.1 Merkle tree: tree head, inclusion and consistency proofs. Pure functions
//! over leaf hashes (SHA-256(0x00 ‖ leaf)); interior nodes are SHA-256(0x01 ‖ left ‖ right).

/// A SHA-256 value: a leaf hash, an interior node, a root.
pub type Hash = [u8; 32];

/// The leaf hash of one record's bytes: SHA-256(0x00 ‖ data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut s = keyfab_crypto::hash::Sha256Stream::default();
    s.update(&[0x00]);
    s.update(data);
    s.finish()
}

/// An interior node: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut s = keyfab_crypto::hash::Sha256Stream::default();
    s.update(&[0x01]);
    s.update(left);
    s.update(right);
    s.finish()
}

/// The largest power of two strictly less than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// `MTH(D[n])`: the root of the tree over `leaves`. The empty tree's root is SHA-256("").
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => keyfab_crypto::hash::sha256(b""),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// `PATH(m, D[n])`: the audit path of leaf `index`.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 || index >= n {
        return Vec::new();
    }
    let k = split(n);
    if index < k {
        let mut p = inclusion_proof(index, &leaves[..k]);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(index - k, &leaves[k..]);
        p.push(root(&leaves[..k]));
        p
    }
}

/// RFC 9162 §2.1.3.2.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root_hash: &Hash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && &r == root_hash
}

/// `PROOF(m, D[n])`: proof that the first `m` leaves are a prefix of `leaves`.
pub fn consistency_proof(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    if m == 0 || m >= leaves.len() {
        return Vec::new();
    }
    subproof(m, leaves, true)
}

fn subproof(m: usize, leaves: &[Hash], b: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if b { Vec::new() } else { vec![root(leaves)] };
    }
    let k = split(n);
    if m <= k {
        let mut p = subproof(m, &leaves[..k], b);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = subproof(m - k, &leaves[k..], false);
        p.push(root(&leaves[..k]));
        p
    }
}

/// RFC 9162 §2.1.4.2: checks that the tree of size `m` with root `first` is a prefix of
/// the tree of size `n` with root `second`.
pub fn verify_consistency(m: u64, n: u64, first: &Hash, second: &Hash, proof: &[Hash]) -> bool {
    if m > n {
        return false;
    }
    if m == n {
        return proof.is_empty() && first == second;
    }
    if m == 0 {
        return proof.is_empty();
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if m.is_power_of_two() {
        path.insert(0, *first);
    }
    let Some((start, rest)) = path.split_first() else {
        return false;
    };
    let (mut f_n, mut s_n) = (m - 1, n - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in rest {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && &fr == first && &sr == second
}

/// The right edge of a growing tree: the roots of its perfect subtrees, largest first.
/// Enough to compute the root after appending leaves, without the earlier leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (height, root) of each perfect subtree, left to right.
    nodes: Vec<(u32, Hash)>,
}

impl Frontier {
    /// How many leaves the tree has.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(h, left)) = self.nodes.last() {
            if h != node.0 {
                break;
            }
            self.nodes.pop();
            node = (h + 1, node_hash(&left, &node.1));
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// MTH of every leaf pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(&(_, last)) = it.next() else {
            return root(&[]);
        };
        it.fold(last, |acc, (_, left)| node_hash(left, &acc))
    }

    /// For storage: the subtree roots with their heights.
    pub fn to_parts(&self) -> (u64, Vec<(u32, Hash)>) {
        (self.size, self.nodes.clone())
    }

    /// Rebuilds a frontier; `None` if the heights do not describe `size` leaves.
    pub fn from_parts(size: u64, nodes: Vec<(u32, Hash)>) -> Option<Self> {
        let total: u64 = nodes
            .iter()
            .map(|(h, _)| 1u64.checked_shl(*h).unwrap_or(0))
            .sum();
        let decreasing = nodes.windows(2).all(|w| w[0].0 > w[1].0);
        (total == size && decreasing).then_some(Self { size, nodes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Certificate Transparency reference inputs (RFC 6962 test data).
    const DATA: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn h(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    fn leaves() -> Vec<Hash> {
        DATA.iter()
            .map(|d| leaf_hash(&hex::decode(d).unwrap()))
            .collect()
    }

    #[test]
    fn frontier_roots_equal_tree_roots() {
        let l: Vec<Hash> = (0u8..70).map(|i| leaf_hash(&[i])).collect();
        let mut f = Frontier::default();
        assert_eq!(f.root(), root(&[]));
        for n in 1..=l.len() {
            f.push(l[n - 1]);
            assert_eq!(f.root(), root(&l[..n]), "size {n}");
            let (size, parts) = f.to_parts();
            assert_eq!(Frontier::from_parts(size, parts).unwrap(), f);
        }
        assert!(Frontier::from_parts(3, vec![(0, l[0])]).is_none());
    }

    #[test]
    fn roots_match_the_reference() {
        let l = leaves();
        for n in 0..=8 {
            assert_eq!(hex::encode(root(&l[..n])), ROOTS[n], "size {n}");
        }
    }

    #[test]
    fn inclusion_proofs_match_the_reference() {
        let l = leaves();
        let p = inclusion_proof(0, &l);
        let want = [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ];
        assert_eq!(p.iter().map(hex::encode).collect::<Vec<_>>(), want);
        assert!(verify_inclusion(0, 8, &l[0], &p, &h(ROOTS[8])));
        assert!(!verify_inclusion(0, 8, &l[1], &p, &h(ROOTS[8])));
    }

    #[test]
    fn consistency_proofs_match_the_reference() {
        let l = leaves();
        let cases: [(usize, usize, &[&str]); 4] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (m, n, want) in cases {
            let p = consistency_proof(m, &l[..n]);
            assert_eq!(
                p.iter().map(hex::encode).collect::<Vec<_>>(),
                want,
                "{m}->{n}"
            );
            assert!(
                verify_consistency(m as u64, n as u64, &h(ROOTS[m]), &h(ROOTS[n]), &p),
                "{m}->{n}"
            );
        }
    }

    #[test]
    fn every_proof_of_every_size_verifies_and_tampering_fails() {
        let l: Vec<Hash> = (0u8..37)
            .map(|i| leaf_hash(&[i, i.wrapping_mul(7)]))
            .collect();
        for n in 1..=l.len() {
            let r = root(&l[..n]);
            for i in 0..n {
                let p = inclusion_proof(i, &l[..n]);
                assert!(
                    verify_inclusion(i as u64, n as u64, &l[i], &p, &r),
                    "leaf {i} of {n}"
                );
                // Size and root are only meaningful together (a signed checkpoint binds
                // both): what must fail is a wrong leaf or a wrong root.
                let mut other = l[i];
                other[5] ^= 1;
                assert!(!verify_inclusion(i as u64, n as u64, &other, &p, &r));
                let mut bad_root = r;
                bad_root[0] ^= 1;
                assert!(!verify_inclusion(i as u64, n as u64, &l[i], &p, &bad_root));
            }
            for m in 1..=n {
                let p = consistency_proof(m, &l[..n]);
                let rm = root(&l[..m]);
                assert!(
                    verify_consistency(m as u64, n as u64, &rm, &r, &p),
                    "{m}->{n}"
                );
                if m < n {
                    let mut bad = rm;
                    bad[0] ^= 1;
                    assert!(
                        !verify_consistency(m as u64, n as u64, &bad, &r, &p),
                        "{m}->{n} tampered"
                    );
                }
            }
        }
    }
}
