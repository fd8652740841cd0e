package Crypt::Ed25519;

# A stand-in for CPAN's Crypt::Ed25519, which Debian does not package, written for
# scripts/sytest. It provides only the functions SyTest calls (eddsa_secret_key,
# eddsa_public_key, eddsa_sign, verify, and eddsa_verify which is the same check), over
# CryptX's Crypt::PK::Ed25519 (Debian: libcryptx-perl). Keys are 32-byte raw seeds and
# public keys and signatures are raw bytes, as in the original's "eddsa_" interface.

use strict;
use warnings;

use Carp qw( croak );
use Crypt::PK::Ed25519;
use Crypt::PRNG qw( random_bytes );

our $VERSION = '1.05';

sub _private_key
{
   my ( $secret_key ) = @_;
   defined $secret_key and length( $secret_key ) == 32
      or croak "Crypt::Ed25519: secret key must be 32 bytes";
   return Crypt::PK::Ed25519->new->import_key_raw( $secret_key, 'private' );
}

# A new random 32-byte secret key (seed).
sub eddsa_secret_key
{
   return random_bytes( 32 );
}

# The 32-byte public key of a secret key.
sub eddsa_public_key
{
   my ( $secret_key ) = @_;
   return _private_key( $secret_key )->export_key_raw( 'public' );
}

# eddsa_sign( $message, $public_key, $secret_key ): the 64-byte signature. The public key is
# derived from the secret one; the argument is accepted for the original's signature.
sub eddsa_sign
{
   my ( $message, undef, $secret_key ) = @_;
   return _private_key( $secret_key )->sign_message( $message );
}

# eddsa_verify( $message, $public_key, $signature ): true when the signature is valid. A
# malformed key or signature is simply "not valid", never an exception.
sub eddsa_verify
{
   my ( $message, $public_key, $signature ) = @_;
   return 0 unless defined $public_key and length( $public_key ) == 32;
   return 0 unless defined $signature and length( $signature ) == 64;
   my $ok = eval {
      Crypt::PK::Ed25519->new->import_key_raw( $public_key, 'public' )
         ->verify_message( $signature, $message );
   };
   return $ok ? 1 : 0;
}

sub eddsa_verify_croak
{
   eddsa_verify( @_ ) or croak "Ed25519 signature verification failed";
   return 1;
}

# The original's older names for the same checks.
*verify       = \&eddsa_verify;
*verify_croak = \&eddsa_verify_croak;

1;
