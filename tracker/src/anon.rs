//! tern's own anonymous mapping for probes and tests is `sys::anon`; here
//! what the tracker's tests add to it.

pub(crate) use sys::anon::AnonRegion;

/// Page indices (from the region's start) covered by PAGEMAP_SCAN regions.
#[cfg(test)]
pub(crate) trait PageIndices {
    fn page_indices(&self, regions: &[crate::pagemap_scan::PageRegion]) -> Vec<u64>;
}

#[cfg(test)]
impl PageIndices for AnonRegion {
    fn page_indices(&self, regions: &[crate::pagemap_scan::PageRegion]) -> Vec<u64> {
        regions
            .iter()
            .flat_map(|r| {
                (r.start..r.end)
                    .step_by(4096)
                    .map(|a| (a - self.start()) / 4096)
            })
            .collect()
    }
}
