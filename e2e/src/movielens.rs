//! MovieLens-100K as RecBole ships it (`ml-100k.inter`, `ml-100k.item`), fetched by
//! `scripts/assets.py fetch movielens` and never committed (its licence forbids redistribution).
//!
//! Both files are tab-separated with a header whose column names carry RecBole type suffixes
//! (`user_id:token`, `rating:float`, …). Columns are found by name, so a reordered file still
//! loads. Users and items get dense indices (`0..n`) in order of their numeric ids, so every
//! run numbers them the same way.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Why the data set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MovieLensError {
    /// A file could not be read.
    #[error(
        "cannot read {path}: {source} (fetch it with `python3 scripts/assets.py fetch movielens`, or set OMEGA_MOVIELENS_DIR)"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A header lacks a column.
    #[error("{file}: no column `{column}` in the header")]
    MissingColumn {
        /// The file.
        file: String,
        /// Column name without its type suffix.
        column: &'static str,
    },
    /// A row could not be parsed.
    #[error("{file}:{line}: {reason}")]
    BadRow {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        reason: String,
    },
    /// The interactions name an item the item file lacks.
    #[error("item {0} is rated but missing from ml-100k.item")]
    UnknownItem(u32),
}

/// A film of the catalogue.
#[derive(Debug, Clone, PartialEq)]
pub struct Movie {
    /// MovieLens item id.
    pub item_id: u32,
    /// Title without the year.
    pub title: String,
    /// Release year, when known.
    pub year: Option<u16>,
    /// Genre words (`Animation`, `Children's`, …).
    pub genres: Vec<String>,
}

impl Movie {
    /// The content id Omega uses for this film (`ml-<item id>`).
    pub fn content_id(&self) -> String {
        format!("ml-{}", self.item_id)
    }
}

/// One rating: dense user and item indices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rating {
    /// Dense user index.
    pub user: u32,
    /// Dense item index.
    pub item: u32,
    /// 1-5 stars.
    pub rating: f32,
    /// Unix seconds.
    pub timestamp: i64,
}

/// The whole data set, with dense indices.
#[derive(Debug, Clone)]
pub struct MovieLens {
    /// Original user ids, by dense index.
    pub user_ids: Vec<u32>,
    /// Films, by dense index.
    pub movies: Vec<Movie>,
    /// Every rating, in file order.
    pub ratings: Vec<Rating>,
}

impl MovieLens {
    /// Number of users.
    pub fn n_users(&self) -> usize {
        self.user_ids.len()
    }

    /// Number of items.
    pub fn n_items(&self) -> usize {
        self.movies.len()
    }

    /// Loads `ml-100k.inter` and `ml-100k.item` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, MovieLensError> {
        let inter = read(&dir.join("ml-100k.inter"))?;
        let items = read(&dir.join("ml-100k.item"))?;
        Self::parse(&inter, &items)
    }

    /// Loads from [`default_dir`].
    pub fn load_default() -> Result<Self, MovieLensError> {
        Self::load(&default_dir())
    }

    /// Parses the two files' contents.
    pub fn parse(inter: &str, items: &str) -> Result<Self, MovieLensError> {
        let movies_by_id = parse_items(items)?;
        let raw = parse_inter(inter)?;
        let users: BTreeSet<u32> = raw.iter().map(|r| r.0).collect();
        let user_ids: Vec<u32> = users.into_iter().collect();
        let user_index: HashMap<u32, u32> =
            user_ids.iter().enumerate().map(|(i, &u)| (u, i as u32)).collect();
        let mut movies: Vec<Movie> = movies_by_id.into_values().collect();
        movies.sort_by_key(|m| m.item_id);
        let item_index: HashMap<u32, u32> =
            movies.iter().enumerate().map(|(i, m)| (m.item_id, i as u32)).collect();
        let ratings = raw
            .into_iter()
            .map(|(u, i, rating, timestamp)| {
                let item = *item_index.get(&i).ok_or(MovieLensError::UnknownItem(i))?;
                Ok(Rating { user: user_index[&u], item, rating, timestamp })
            })
            .collect::<Result<_, MovieLensError>>()?;
        Ok(MovieLens { user_ids, movies, ratings })
    }

    /// Keeps the first `n` users (by dense index) and their ratings; items are kept whole so
    /// that candidate sampling sees the same catalogue.
    pub fn first_users(mut self, n: usize) -> Self {
        if n >= self.user_ids.len() {
            return self;
        }
        self.user_ids.truncate(n);
        self.ratings.retain(|r| (r.user as usize) < n);
        self
    }
}

/// `$OMEGA_MOVIELENS_DIR`, else `ml-100k/` under `$OMEGA_CACHE`, else under the first
/// `.omega-cache/` found walking up from the current directory.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OMEGA_MOVIELENS_DIR") {
        return PathBuf::from(d);
    }
    if let Some(c) = std::env::var_os("OMEGA_CACHE") {
        return PathBuf::from(c).join("ml-100k");
    }
    let start = std::env::current_dir().unwrap_or_default();
    for dir in start.ancestors() {
        let c = dir.join(".omega-cache");
        if c.is_dir() {
            return c.join("ml-100k");
        }
    }
    start.join(".omega-cache").join("ml-100k")
}

fn read(path: &Path) -> Result<String, MovieLensError> {
    std::fs::read_to_string(path)
        .map_err(|source| MovieLensError::Io { path: path.to_path_buf(), source })
}

/// Column positions by name (the part before `:`).
fn columns<const N: usize>(
    file: &str,
    header: &str,
    names: [&'static str; N],
) -> Result<[usize; N], MovieLensError> {
    let cols: Vec<&str> = header.split('\t').map(|c| c.split(':').next().unwrap_or(c)).collect();
    let mut out = [0; N];
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = cols
            .iter()
            .position(|c| *c == name)
            .ok_or(MovieLensError::MissingColumn { file: file.into(), column: name })?;
    }
    Ok(out)
}

fn field<'a>(
    file: &str,
    line: usize,
    row: &[&'a str],
    i: usize,
) -> Result<&'a str, MovieLensError> {
    row.get(i).copied().ok_or_else(|| MovieLensError::BadRow {
        file: file.into(),
        line,
        reason: format!("expected at least {} columns, got {}", i + 1, row.len()),
    })
}

fn number<T: std::str::FromStr>(file: &str, line: usize, s: &str) -> Result<T, MovieLensError> {
    s.trim().parse().map_err(|_| MovieLensError::BadRow {
        file: file.into(),
        line,
        reason: format!("`{s}` is not a number"),
    })
}

type RawRating = (u32, u32, f32, i64);

fn parse_inter(text: &str) -> Result<Vec<RawRating>, MovieLensError> {
    const F: &str = "ml-100k.inter";
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let [u, i, r, t] = columns(F, header, ["user_id", "item_id", "rating", "timestamp"])?;
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Vec<&str> = line.split('\t').collect();
        let ln = n + 2;
        let rating: f32 = number(F, ln, field(F, ln, &row, r)?)?;
        let ts: f64 = number(F, ln, field(F, ln, &row, t)?)?;
        out.push((
            number(F, ln, field(F, ln, &row, u)?)?,
            number(F, ln, field(F, ln, &row, i)?)?,
            rating,
            ts as i64,
        ));
    }
    Ok(out)
}

fn parse_items(text: &str) -> Result<HashMap<u32, Movie>, MovieLensError> {
    const F: &str = "ml-100k.item";
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let [i, t, y, c] = columns(F, header, ["item_id", "movie_title", "release_year", "class"])?;
    let mut out = HashMap::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Vec<&str> = line.split('\t').collect();
        let ln = n + 2;
        let item_id: u32 = number(F, ln, field(F, ln, &row, i)?)?;
        let year = row.get(y).and_then(|s| s.trim().parse().ok());
        let genres = row
            .get(c)
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let title = field(F, ln, &row, t)?.trim().to_owned();
        out.insert(item_id, Movie { item_id, title, year, genres });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ITEMS: &str = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
        1\tToy Story\t1995\tAnimation Children's Comedy\n\
        7\tTwelve Monkeys\t1995\tDrama Sci-Fi\n\
        3\tFour Rooms\t\tThriller\n";
    const INTER: &str = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n\
        196\t7\t3\t881250949\n\
        22\t1\t5\t881250950\n\
        196\t3\t4\t881250951\n";

    #[test]
    fn parses_columns_by_name_with_dense_sorted_indices() {
        let ml = MovieLens::parse(INTER, ITEMS).expect("parse");
        assert_eq!(ml.user_ids, vec![22, 196]);
        assert_eq!(ml.movies.iter().map(|m| m.item_id).collect::<Vec<_>>(), vec![1, 3, 7]);
        assert_eq!(ml.movies[0].genres, vec!["Animation", "Children's", "Comedy"]);
        assert_eq!(ml.movies[1].year, None);
        assert_eq!(ml.movies[2].content_id(), "ml-7");
        assert_eq!(ml.ratings[0], Rating { user: 1, item: 2, rating: 3.0, timestamp: 881_250_949 });
    }

    #[test]
    fn bad_input_is_reported_with_its_line() {
        let cases = [
            (INTER.replace("881250950", "soon"), "ml-100k.inter:3: `soon` is not a number"),
            (INTER.replace("rating:float", "stars:float"), "no column `rating`"),
            (INTER.replace("196\t3", "196\t99"), "item 99 is rated but missing"),
        ];
        for (inter, want) in cases {
            let err = MovieLens::parse(&inter, ITEMS).expect_err(want);
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn first_users_keeps_their_ratings_and_the_whole_catalogue() {
        let ml = MovieLens::parse(INTER, ITEMS).expect("parse").first_users(1);
        assert_eq!(ml.n_users(), 1);
        assert_eq!(ml.n_items(), 3);
        assert!(ml.ratings.iter().all(|r| r.user == 0));
    }
}
